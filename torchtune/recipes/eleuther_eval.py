# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Evaluate a model with EleutherAI's lm-evaluation-harness.

    tune eleuther_eval --config eleuther_eval
    tune eleuther_eval --config tiny/eval tasks=[my_task] include_path=/path/to/tasks

The model comes through the same checkpointers as fine-tuning: a base model, a full fine-tune,
or a base model plus a LoRA adapter (``checkpointer.adapter_checkpoint`` with a LoRA ``model``
config), which is merged into the base weights before evaluation. A folder a training run wrote
(``checkpointer.checkpoint_dir=<output_dir>/epoch_N``) loads as it is, its files found with
``checkpoint_files: null``. ``max_seq_length: null`` (the default) is the model's ``max_seq_len``. It is wrapped as an
``lm_eval`` language model (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``,
batched; generation uses the KV cache) and run through the harness's own evaluator. The
harness's results table goes to stdout and its results JSON to ``output_dir``.

``apply_chat_template`` (true, or a template name), ``system_instruction`` and
``fewshot_as_multiturn`` are the harness's own options: the prompts are then rendered by the
tokenizer's chat template, which needs a tokenizer that has one (``torchtune.models.hf_tokenizer``).

lm-eval is the optional extra ``eval``: ``pip install -e ".[eval]"`` (or ``pip install lm-eval``).
"""

import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from jinja2 import TemplateError
from omegaconf import DictConfig, ListConfig
from torch import nn

from torchtune import config, utils
from torchtune.data import padding_id
from torchtune.modules.peft import get_adapter_params, merge_lora_in_place

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    _LM_EVAL_IMPORT_ERROR: Optional[ImportError] = None
except ImportError as e:  # the recipe says how to install it when it runs
    TemplateLM = object
    _LM_EVAL_IMPORT_ERROR = e

log = logging.getLogger(__name__)

INSTALL_HINT = (
    'The eleuther_eval recipe needs EleutherAI\'s lm-evaluation-harness: pip install -e ".[eval]" '
    "in a torchtune checkout, or pip install lm-eval"
)


def _require_lm_eval() -> None:
    if _LM_EVAL_IMPORT_ERROR is not None:
        raise ImportError(f"{INSTALL_HINT} ({_LM_EVAL_IMPORT_ERROR})") from _LM_EVAL_IMPORT_ERROR


class TorchTuneLM(TemplateLM):
    """A torchtune decoder + tokenizer as an ``lm_eval`` language model.

    Scoring follows the harness's HF model (``HFLM``) request by request: contexts and
    continuations are tokenised through ``TemplateLM`` (continuation = tokens of
    ``context + continuation`` after those of ``context``), an empty context is replaced by BOS,
    inputs longer than ``max_seq_length + 1`` lose tokens on the left, and rolling
    loglikelihoods use the harness's disjoint windows with BOS as the first context.

    With a tokenizer that has a chat template (``render``, ``chat_template``), the harness's
    ``apply_chat_template`` option renders prompts through it, as ``HFLM`` does through
    ``transformers``. Such a prompt already begins with the template's BOS text, so, like
    ``HFLM``, a string that begins with it is encoded without adding another.

    Args:
        model: the decoder, in eval mode, on ``device``.
        tokenizer: a torchtune tokenizer (``encode``, ``decode``, ``bos_id``, ``eos_id``,
            ``pad_id``; optionally ``stop_token_ids`` and the chat methods).
        device: where the model lives.
        max_seq_length: the longest token sequence fed to the model.
        batch_size: requests per forward.
        add_bos: start every request with BOS (Llama2 was trained that way).
        max_gen_toks: default cap on generated tokens when a task does not set one.
        generator: RNG for tasks that sample.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        device: torch.device,
        max_seq_length: int,
        batch_size: int = 8,
        add_bos: bool = True,
        max_gen_toks: int = 256,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        _require_lm_eval()
        super().__init__()
        if max_seq_length < 2 or max_seq_length > model.max_seq_len:
            raise ValueError(
                f"max_seq_length must be in [2, model max_seq_len={model.max_seq_len}], got {max_seq_length}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._model = model
        self._tokenizer = tokenizer
        self._device = device
        self._max_seq_length = max_seq_length
        self._batch_size = batch_size
        self._add_bos = add_bos
        self._max_gen_toks = max_gen_toks
        self._generator = generator
        # Chat models end a turn with their own token (Llama 3's <|eot_id|>) besides EOS.
        self._stop_ids = list(getattr(tokenizer, "stop_token_ids", None) or [tokenizer.eos_id])
        self._bos_text = ""
        if getattr(tokenizer, "chat_template", None) and tokenizer.bos_id is not None:
            self._bos_text = tokenizer.decode([tokenizer.bos_id], skip_special_tokens=False)

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # HFLM's choice: BOS, or EOS for tokenizers without one (Qwen).
        bos_id = self._tokenizer.bos_id
        return self._tokenizer.eos_id if bos_id is None else bos_id

    @property
    def max_length(self) -> int:
        return self._max_seq_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        # Only names the harness's request cache; the template text is what changes requests.
        template = self.chat_template(True) or ""
        digest = hashlib.sha256(template.encode()).hexdigest()[:16]
        return f"{type(self._tokenizer).__name__}-{digest}"

    def chat_template(self, chat_template: Union[bool, str] = False) -> Optional[str]:
        """The template text the harness logs (None when chat templating is off).

        A template name changes nothing: as with ``HFLM``, prompts are rendered with the
        tokenizer's default template, whose text this is.
        """
        if chat_template is False or chat_template is None:
            return None
        if isinstance(chat_template, str):
            log.warning(
                "apply_chat_template=%r: prompts use the tokenizer's default chat template, as "
                "lm-eval's HF model does",
                chat_template,
            )
        return getattr(self._tokenizer, "chat_template", None)

    def apply_chat_template(
        self, chat_history: List[Dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation with the tokenizer's chat template.

        Args:
            chat_history: ``[{"role": ..., "content": ...}, ...]``.
            add_generation_prompt: open the assistant's turn after the last message. False
                means the last message is an assistant's answer prefix (a task's ``gen_prefix``)
                that the model continues, so the text ends right after it (what ``HFLM`` gets
                from transformers' ``continue_final_message``).

        Returns:
            The rendered text, with the template's BOS text when it writes one.
        """
        try:
            text = self._tokenizer.render(chat_history, add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            # HFLM's fallback for templates that raise on a system turn (Mistral's); the
            # tokenizer wraps the template's error in a ValueError.
            if not isinstance(e.__cause__, TemplateError):
                raise
            log.warning("The chat template failed (%s); rendering without the system turns", e)
            chat_history = [m for m in chat_history if m["role"] != "system"]
            text = self._tokenizer.render(chat_history, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt:
            return text
        # Cut what the template adds after the final message (its end-of-turn), so the model
        # continues that message; templates may strip it, hence the second try.
        final = chat_history[-1]["content"]
        if final not in text:
            final = final.strip()
        if final not in text:
            raise ValueError(
                f"The chat template does not write the final message {final!r} into its text, "
                "so it cannot be continued (the task's gen_prefix)"
            )
        return text[: text.rindex(final) + len(final)]

    def tok_encode(
        self, string: str, add_special_tokens: Optional[bool] = None, **kwargs
    ) -> List[int]:
        add_bos = self._add_bos if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            add_bos = False  # a rendered chat prompt: its template wrote the BOS already
        return self._tokenizer.encode(string, add_bos=add_bos, add_eos=False)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode(list(tokens))

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: List[Tuple[Any, List[int], List[int]]], disable_tqdm: bool = False, **kwargs
    ) -> List[Tuple[float, bool]]:
        """Score ``(key, context_tokens, continuation_tokens)`` requests.

        Returns:
            ``(sum of continuation log-probs, whether greedy decoding gives the continuation)``
            per request, in request order.
        """
        inputs = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError(f"empty context or continuation tokens in request {(ctx, cont)}")
            if len(cont) > self.max_length:
                raise ValueError(
                    f"continuation of {len(cont)} tokens exceeds max_seq_length={self.max_length}"
                )
            # The last token is only predicted, never fed; left-truncate to the window.
            inputs.append((ctx + cont)[-(self.max_length + 1) :][:-1])
        # Longest first: one padding width per batch, and memory problems show up at once.
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = len(inputs[idx[0]])
            tokens = torch.full((len(idx), width), padding_id(self._tokenizer), dtype=torch.long)
            for row, i in enumerate(idx):
                tokens[row, : len(inputs[i])] = torch.tensor(inputs[i])
            # Right padding needs no mask: causal attention never looks ahead at it.
            logits = self._model(tokens.to(self._device))  # [b, s, v]
            for row, i in enumerate(idx):
                cont = requests[i][2]
                n = len(inputs[i])
                # Softmax in fp32, and only over the scored positions: [b, s, v] in fp32 is large.
                lp = F.log_softmax(logits[row, n - len(cont) : n].float(), dim=-1)  # [len(cont), v]
                cont_t = torch.tensor(cont, device=lp.device)
                score = lp.gather(-1, cont_t.unsqueeze(-1)).sum().item()
                greedy = bool((lp.argmax(dim=-1) == cont_t).all())
                results[i] = (score, greedy)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Log-likelihood of whole documents in disjoint ``max_seq_length`` windows (perplexity)."""
        windows, owner = [], []
        for r, req in enumerate(requests):
            (text,) = req.args
            # Encoded like HFLM does (with BOS when add_bos), then BOS as the first window's context.
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (score, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[r] += score
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy (or sampled, when a task asks) generation until a stop string or EOS."""
        groups: Dict[str, List[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: List[Optional[str]] = [None] * len(requests)
        for idx in groups.values():
            until, max_gen, sampling = self._parse_gen_kwargs(requests[idx[0]].args[1])
            max_ctx = self.max_length - max_gen
            if max_ctx < 1:
                raise ValueError(
                    f"max_gen_toks={max_gen} leaves no room for a prompt within "
                    f"max_seq_length={self.max_length}"
                )
            prompts = {i: self.tok_encode(requests[i].args[0])[-max_ctx:] for i in idx}
            idx = sorted(idx, key=lambda i: -len(prompts[i]))

            def stop_fn(toks: List[int], until=until) -> bool:
                text = self.tok_decode(toks)
                return any(s in text for s in until)

            for start in range(0, len(idx), self.batch_size):
                batch = idx[start : start + self.batch_size]
                new = utils.generate(
                    self._model,
                    [prompts[i] for i in batch],
                    max_gen,
                    stop_tokens=self._stop_ids,
                    pad_id=padding_id(self._tokenizer),
                    generator=self._generator,
                    stop_fn=stop_fn if until else None,
                    **sampling,
                )
                for i, toks in zip(batch, new):
                    text = self.tok_decode(toks)
                    for s in until:
                        text = text.split(s)[0]
                    out[i] = text
        return out

    def _parse_gen_kwargs(
        self, gen_kwargs: Dict[str, Any]
    ) -> Tuple[List[str], int, Dict[str, Any]]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        until = [s for s in until if s]  # an empty stop string would cut everything
        max_gen = kwargs.pop("max_gen_toks", None) or kwargs.pop("max_new_tokens", None)
        max_gen = int(max_gen or self.max_gen_toks)
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        sampling = {"temperature": temperature if do_sample else 0.0}
        if do_sample:
            sampling["temperature"] = temperature or 1.0
            sampling["top_k"] = kwargs.pop("top_k", None)
            sampling["top_p"] = kwargs.pop("top_p", None)
        return until, max_gen, sampling


class EleutherEvalRecipe:
    """Load a (fine-tuned) model through a checkpointer and evaluate it with lm-eval.

    Args:
        cfg: the recipe config; see ``recipes/configs/eleuther_eval.yaml``.

    Raises:
        ImportError: if lm-eval is not installed (with the install command).
        ValueError: on bad ``tasks``, ``limit``, ``batch_size``, ``max_seq_length`` (null means
            the model's ``max_seq_len``) or chat options, or ``apply_chat_template`` with a
            tokenizer that has no chat template.
    """

    def __init__(self, cfg: DictConfig) -> None:
        _require_lm_eval()
        self._device = utils.get_device(cfg.device)
        self._dtype = utils.get_dtype(cfg.dtype, self._device)
        self._seed = utils.set_seed(cfg.seed)
        tasks = cfg.tasks
        if isinstance(tasks, str):
            tasks = [tasks]
        if not isinstance(tasks, (list, ListConfig)) or not tasks:
            raise ValueError(
                f"Config key 'tasks' must be a non-empty list of task names, got {tasks!r}"
            )
        self._tasks = [str(t) for t in tasks]
        if cfg.limit is not None and float(cfg.limit) <= 0:
            raise ValueError(f"Config key 'limit' must be > 0 or null, got {cfg.limit}")
        self._limit = cfg.limit
        self._num_fewshot = cfg.num_fewshot
        self._batch_size = int(cfg.batch_size)
        # null (or absent): the model's own max_seq_len, known once the model is built.
        max_seq_length = cfg.get("max_seq_length")
        self._max_seq_length = None if max_seq_length is None else int(max_seq_length)
        self._add_bos = bool(cfg.add_bos)
        self._include_path = cfg.include_path
        self._include_default_tasks = bool(cfg.include_default_tasks)
        self._output_dir = Path(cfg.output_dir)
        # The harness's chat options; configs written before them have none of these keys.
        self._apply_chat_template = cfg.get("apply_chat_template", False)
        if (
            not isinstance(self._apply_chat_template, (bool, str))
            or self._apply_chat_template == ""
        ):
            raise ValueError(
                "Config key 'apply_chat_template' must be true, false or a chat template name, "
                f"got {self._apply_chat_template!r}"
            )
        self._system_instruction = cfg.get("system_instruction")
        if self._system_instruction is not None and not isinstance(self._system_instruction, str):
            raise ValueError(
                "Config key 'system_instruction' must be a string or null, "
                f"got {self._system_instruction!r}"
            )
        self._fewshot_as_multiturn = bool(cfg.get("fewshot_as_multiturn", False))
        if self._fewshot_as_multiturn and not self._apply_chat_template:
            raise ValueError(
                "Config key 'fewshot_as_multiturn' needs apply_chat_template (the few-shot "
                "examples become chat turns)"
            )

    def setup(self, cfg: DictConfig) -> None:
        # The tokenizer first: chat options it cannot serve fail before any weights load.
        self._tokenizer = config.instantiate(cfg.tokenizer)
        if self._apply_chat_template and not getattr(self._tokenizer, "chat_template", None):
            raise ValueError(
                f"apply_chat_template={self._apply_chat_template!r} needs a tokenizer with a chat "
                f"template, and tokenizer '{cfg.tokenizer._component_}' has none. Use "
                "torchtune.models.hf_tokenizer with the model's Hugging Face folder (tokenizer.json "
                "and a tokenizer_config.json with a chat_template), or apply_chat_template=false"
            )
        checkpointer = config.instantiate(cfg.checkpointer)
        ckpt = checkpointer.load_checkpoint()
        self._model = self._setup_model(cfg.model, ckpt["model"], ckpt.get("adapter"))
        model_max = self._model.max_seq_len
        if self._max_seq_length is None:
            self._max_seq_length = model_max
        elif not 2 <= self._max_seq_length <= model_max:
            raise ValueError(
                f"Config key 'max_seq_length' is {self._max_seq_length}, but the model "
                f"'{cfg.model._component_}' takes at most max_seq_len={model_max} tokens (and at "
                "least 2); set max_seq_length=null to use the model's"
            )

    def _setup_model(
        self,
        cfg_model: DictConfig,
        model_sd: Dict[str, torch.Tensor],
        adapter_sd: Optional[Dict[str, torch.Tensor]],
    ) -> nn.Module:
        with utils.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg_model)
        lora_keys = set(get_adapter_params(model))
        if adapter_sd is None and lora_keys:
            raise ValueError(
                f"Model '{cfg_model._component_}' has LoRA adapters but checkpointer.adapter_checkpoint "
                "is not set; give the adapter file, or use the base model builder for a merged checkpoint"
            )
        if adapter_sd is not None and not lora_keys:
            raise ValueError(
                f"checkpointer.adapter_checkpoint is set but model '{cfg_model._component_}' has no LoRA "
                "layers; use the LoRA builder (e.g. lora_llama2 with the training config's lora_* keys)"
            )
        state = {**model_sd, **(adapter_sd or {})}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"Checkpoint does not fit model '{cfg_model._component_}': missing "
                f"{_first(missing)}, unexpected {_first(unexpected)}. The checkpoint is for another "
                "model: give the model builder and sizes that match checkpointer.checkpoint_dir "
                "(its config.json)"
            )
        if lora_keys:
            model = merge_lora_in_place(model)
            log.info("Merged the LoRA adapter into the base weights")
        return model.eval()

    def evaluate(self) -> Dict[str, Any]:
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.loggers import EvaluationTracker
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table

        lm = TorchTuneLM(
            self._model,
            self._tokenizer,
            device=self._device,
            max_seq_length=self._max_seq_length,
            batch_size=self._batch_size,
            add_bos=self._add_bos,
        )
        include = self._include_path
        if include is not None and not isinstance(include, str):
            include = [str(p) for p in include]
        task_manager = TaskManager(
            include_path=include, include_defaults=self._include_default_tasks
        )
        tracker = EvaluationTracker(output_path=str(self._output_dir / "eval_results.json"))
        t0 = time.perf_counter()
        results = simple_evaluate(
            model=lm,
            tasks=self._tasks,
            num_fewshot=self._num_fewshot,
            limit=self._limit,
            task_manager=task_manager,
            evaluation_tracker=tracker,
            log_samples=False,
            random_seed=self._seed,
            numpy_random_seed=self._seed,
            torch_random_seed=self._seed,
            fewshot_random_seed=self._seed,
            apply_chat_template=self._apply_chat_template,
            system_instruction=self._system_instruction,
            fewshot_as_multiturn=self._fewshot_as_multiturn,
        )
        log.info("Evaluation took %.1f s", time.perf_counter() - t0)
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        tracker.save_results_aggregated(results=results, samples=None)
        written = sorted(self._output_dir.glob("eval_results_*.json"))
        if written:
            print(f"Results JSON: {written[-1]}")
        return results


def _first(keys: List[str], n: int = 4) -> str:
    """``keys`` for a message: the count and the first ``n``, sorted."""
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return f"{len(keys)} keys {keys[:n]}{more}" if keys else "none"


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = EleutherEvalRecipe(cfg)
    recipe.setup(cfg)
    recipe.evaluate()


if __name__ == "__main__":
    if _LM_EVAL_IMPORT_ERROR is not None:  # before the config is even read
        sys.exit(f"eleuther_eval: error: {INSTALL_HINT}")
    sys.exit(recipe_main())
