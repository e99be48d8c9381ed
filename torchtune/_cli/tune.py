# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The ``tune`` command: run recipes, list/copy them, download models, validate configs."""

import os
import sys
from typing import Callable, Dict, List, Optional

from torchtune import __version__
from torchtune._cli import cp, download, ls, plan, run, validate
from torchtune._cli._names import CLIError

COMMANDS: Dict[str, Callable[[List[str]], int]] = {
    "ls": ls.main,
    "cp": cp.main,
    "download": download.main,
    "validate": validate.main,
    "plan": plan.main,
}

_HELP = """\
usage: tune [options] <recipe> [recipe_args]
       tune run [options] <recipe> [recipe_args]
       tune {ls,cp,download,validate,plan} ...

torchtune: fine-tune, evaluate and generate with LLMs in native PyTorch.

commands:
  <recipe> --config <config> [key=value ...]
              run a recipe. <recipe> is a packaged name (see 'tune ls') or a path
              to a .py; <config> is a packaged name or a path to a .yaml. key=value
              overrides a config value (key.sub=value for nested keys); a key that
              binds to nothing is an error. Without [options] the recipe runs in this
              process; any torchrun option (e.g. --nproc_per_node 2) launches it
              through torch.distributed.run. A bad input (a missing file, a wrong
              column, a checkpoint of another size, an absent device) ends the run
              with one paragraph naming the config key and exit status 1; 'tune --debug
              <recipe> ...' (or TUNE_DEBUG=1) shows its traceback.
  run         the same as above: tune run <recipe> --config <config> ...
  ls          list the packaged recipes and their configs
  cp          copy a packaged recipe or config to edit it
  download    download a model from the Hugging Face Hub
  validate    check a config without running it
  plan        predict a run's peak memory per component (--memory: what fits)

Run 'tune <command> --help' for a command's options.

examples:
  tune ls
  tune cp lora_finetune_single_device.yaml my_config.yaml
  tune lora_finetune_single_device --config my_config.yaml epochs=1
  tune --nnodes 1 --nproc_per_node 2 full_finetune_distributed --config llama2/7B_full
  tune validate --config llama2/7B_lora
  tune plan --config llama3_1/8B_lora_single_device --memory 24GiB
  tune download --repo-id meta-llama/Llama-2-7b-hf --output-dir /tmp/Llama-2-7b-hf

"""


def _help() -> str:
    torchrun_help = run.build_parser().format_help()
    marker = "\noptions:\n"
    options = torchrun_help.split(marker, 1)[1] if marker in torchrun_help else torchrun_help
    return _HELP + "options (torchrun; given before <recipe>):\n" + options


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``tune`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--debug":
        from torchtune.config._report import DEBUG_ENV

        # An environment variable, so torchrun's workers see it too.
        os.environ[DEBUG_ENV] = "1"
        argv = argv[1:]
    try:
        if argv and argv[0] in ("-h", "--help"):
            print(_help())
            return 0
        if argv and argv[0] == "--version":
            print(f"torchtune {__version__}")
            return 0
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        if argv and argv[0] == "run":
            argv = argv[1:]
        return run.main(argv)
    except CLIError as e:
        print(f"tune: error: {e}", file=sys.stderr)
        return e.code
    except SystemExit as e:  # argparse errors, and recipes that call sys.exit
        return run.exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
