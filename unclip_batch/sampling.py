"""Per-row sampling settings, declared once.

Each field of ``Sampling`` is a setting a manifest row may give (a column of the same name), a job may
give for rows that leave it empty (``--num-inference-steps`` ...), and a model may default. Everything
else is derived from these declarations: the manifest's column types and range checks, the CLI flags,
the metadata's ``parameters`` struct and the key that decides which rows share a model call. A new
setting is one field here (plus the model code that uses it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from unclip_batch.errors import RowError

MAX_STEPS = 1000  # the schedulers' training timesteps
MAX_GUIDANCE = 100.0
MAX_BEST_OF = 16


# Not mutated: it runs only while the module is imported, before mutmut switches a mutant on, so no test could
# see its mutants (its results are pinned by tests/test_sampling.py and the manifest's range tests).
def setting(
    help: str, *, default=None, least=None, most=None, code: str = "", parameter: bool = True
):  # pragma: no mutate block
    """A Sampling field: ``help`` for its CLI flag; ``default`` when neither row, job nor model sets it (None:
    the model decides, as for sizes); values outside ``least``-``most`` are row errors with ``code``;
    ``parameter``: recorded in the metadata's ``parameters`` struct (sizes have columns of their own)."""
    return field(metadata=dict(help=help, default=default, least=least, most=most, code=code, parameter=parameter))


@dataclass(frozen=True)
class Sampling:
    """Settings shared by every image of one model call (diffusers' argument names; defaults are those of
    diffusers' Kandinsky 2.2 pipelines)."""

    width: int = setting("width for rows without one (default: the model's)", parameter=False)
    height: int = setting("height for rows without one (default: the model's)", parameter=False)
    num_inference_steps: int = setting(
        "decoder steps for rows without their own", default=50, least=1, most=MAX_STEPS, code="invalid_steps"
    )
    guidance_scale: float = setting(
        "decoder guidance for rows without their own", default=4.0, least=0, most=MAX_GUIDANCE, code="invalid_guidance"
    )
    # The prior's UnCLIPScheduler divides by (steps - 1): one step is a ZeroDivisionError, not a sample.
    prior_num_inference_steps: int = setting(
        "prior steps for rows without their own", default=25, least=2, most=MAX_STEPS, code="invalid_steps"
    )
    prior_guidance_scale: float = setting(
        "prior guidance for rows without their own", default=4.0, least=0, most=MAX_GUIDANCE, code="invalid_guidance"
    )
    # A variation row with a prompt: the source's CLIP image embedding is noised this share of the prior's
    # steps back and denoised by the prior with the prompt (diffusers' KandinskyV22PriorEmb2EmbPipeline).
    variation_strength: float = setting(
        "how far a prompt moves a variation from its source, for rows without their own (0: not at all, "
        "1: the prompt alone; diffusers' emb2emb strength)",
        default=0.3,
        least=0,
        most=1,
        code="invalid_strength",
    )
    # unCLIP's reranking (DALL-E 2, section 4): N candidates per image, the one closest to the prompt kept.
    best_of: int = setting(
        "candidates per image for rows without their own: the one whose CLIP score against the prompt is "
        "highest is kept (1-16; N times the model's work per image)",
        default=1,
        least=1,
        most=MAX_BEST_OF,
        code="invalid_best_of",
    )

    def __post_init__(self):
        for f in fields(Sampling):
            value, least, most = getattr(self, f.name), f.metadata["least"], f.metadata["most"]
            if least is not None and not least <= value <= most:
                raise RowError(f.metadata["code"], f"{f.name} is {value}; use {least:g}-{most:g}")

    @classmethod
    def of(cls, values: dict) -> Sampling:
        """The settings among ``values`` (a row as a dict, with other keys besides)."""
        return cls(**{name: values[name] for name in NAMES})


SETTINGS = fields(Sampling)
NAMES = tuple(f.name for f in SETTINGS)
KINDS = {f.name: {"int": int, "float": float}[f.type] for f in SETTINGS}  # annotations are strings here
DEFAULTS = {f.name: f.metadata["default"] for f in SETTINGS if f.metadata["default"] is not None}
PARAMETERS = tuple(f.name for f in SETTINGS if f.metadata["parameter"])  # the metadata's parameters struct


def call_key(row: dict) -> tuple:
    """Rows that can share one model call: same task and settings, and the same prompt kinds (a negative
    prompt, or a prompt steering a variation, changes the call's shape)."""
    return (
        row["task"],
        *(row[name] for name in NAMES),
        bool(row["negative_prompt"]),
        row["task"] == "variation" and bool(row["prompt"]),
    )
