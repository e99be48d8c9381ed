# Copyright (c) torchtune contributors. BSD-3-Clause license.
__version__ = "0.1.0"
