# Copyright (c) torchtune contributors. BSD-3-Clause license.
