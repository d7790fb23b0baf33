"""Generation: the engines (transformers, vLLM) behind one interface (`.engine`), choosing and opening one
(`.backends`), finding and loading models (`.models`), and the model's own judgements: the A/B labeller
(`.labeller`) and the 1-10 rater (`.rater`)."""

from .engine import (
    PAPER_BANNED_CHARACTERS,
    Completion,
    Generator,
    ProgressCallback,
    SamplingSettings,
    banned_token_ids,
    end_of_sequence_ids,
    request_seed,
)


def __getattr__(name: str):
    # The engines load on first use, so importing the interface stays light.
    if name == "TransformersGenerator":
        from .transformers_engine import TransformersGenerator

        return TransformersGenerator
    if name == "VLLMGenerator":
        from .vllm_engine import VLLMGenerator

        return VLLMGenerator
    raise AttributeError(name)


__all__ = ["PAPER_BANNED_CHARACTERS", "Completion", "Generator", "ProgressCallback", "SamplingSettings",
           "banned_token_ids", "end_of_sequence_ids", "request_seed"]
