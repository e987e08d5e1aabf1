"""The one config of pruning (same object in Python, recipes, the CLI and reports): UDFC's MLP-channel
pruning with closed-form compensation, or structured pruning of KV groups and MLP channels."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lowbit.formats.quant_primitives import SUPPORTED_BITS


class PruneConfig(BaseModel):
    """method: udfc (MLP channels, every layer the same width, compensation below) | activation | pg |
    search (KV groups and MLP channels, per-layer widths, least-squares refit: `prune.structured_run`) |
    depth (whole layers, policy gradient: `prune.depth`; ratio = share of layers removed).
    ratio: fraction of each prunable layer's channels removed (global: of all prunable channels; the
    structured methods: of all KV groups and of all MLP channels).
    bits: per-channel symmetric RTN width of every weight (None: no quantization).
    compensation: none | merge (Neuron Merging, one partner) | udfc (closed form).
    family: the UDFC family of T (docs/udfc.md §2): scale (UDFC: rescale kept, combine pruned), prune
    (s′ = 1), full (T free). criterion: l1 | l2 filter norm, or recon (greedy expected output error)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["udfc", "activation", "pg", "search", "depth"] = "udfc"
    ratio: float = Field(0.3, ge=0.0, lt=1.0)
    bits: int | None = None
    compensation: Literal["none", "merge", "udfc"] = "udfc"
    family: Literal["scale", "prune", "full"] = "scale"
    criterion: Literal["l1", "l2", "recon"] = "l2"
    scope: Literal["layer", "global"] = "layer"
    damp: float = Field(1e-6, ge=0)  # ridge on C and G_PP, relative to their mean diagonal
    merge_threshold: float = Field(0.1, ge=-1, le=1)  # Neuron Merging: merge only if cos ≥ this (their ResNet-56 script: 0.1)
    mc_samples: int = Field(8192, ge=16)  # HF data-free proxy: Gaussian samples per layer
    seed: int = 0
    data_light: bool = False  # HF: moments from calibration activations instead of the Gaussian proxy
    calib_samples: int = Field(32, ge=1)
    calib_seqlen: int | None = None
    pg_steps: int = Field(100, ge=1)  # pg: policy steps (2 sampled masks per step)
    search_generations: int = Field(8, ge=1)  # search
    search_population: int = Field(16, ge=2)  # search

    @property
    def needs_data(self) -> bool:
        """Calibration windows: the structured methods' scores and refit, UDFC's data-light moments."""
        return self.method != "udfc" or self.data_light

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if v is not None and v not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit width {v}: choose one of {SUPPORTED_BITS}")
        return v
