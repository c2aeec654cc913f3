"""An offline cache of the frozen Whisper encoder's target-layer states, for multi-epoch training.

The encoder is frozen and the features of an audio are the same in every epoch (no
augmentation), so the L target layers' outputs (`config.target_layer_ids()`) are too: compute
them once per audio, store them, and let `WhisperPerception.forward(encoder_states=...)` take
them instead of running the encoder (docs/training.md#the-frozen-encoder).

- One safetensors file per audio under `directory`, named by a hash of its key (the audio's path
  in the manifest, say): the states [L, T, D] in `dtype`, with metadata (encoder id, target
  layers, state dtype) that `get` checks, so a cache made for another encoder or connector
  cannot be read by mistake.
- Store in the connector's dtype (`for_perception`'s default): the connector casts every state
  to its weights' dtype first, so the stored states are bit for bit what it reads in a run on
  the features (same encoder dtype, same batch). Its outputs then agree to rounding, not bit for
  bit: the live states keep the encoder's memory layout (time fastest), the loaded ones are
  contiguous, and a GEMM may accumulate differently on each (tested).
- Disk per audio: `state_bytes(L, T, D, dtype)`; whisper-large-v3 (L = 4, T = 1500, D = 1280) in
  bf16 is 4 × 1500 × 1280 × 2 = 15,360,000 bytes (15.4 MB) per 30 s clip, ten times the clip's
  fp32 mel features (128 × 3000 × 4 = 1.5 MB).
- Valid while the encoder stays frozen and unchanged; `fill` computes without autocast, in the
  encoder's dtype (fp32 by default: as close to the fp32 reference as the stored dtype allows).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file

STATES_KEY = "states"


def state_bytes(num_layers: int, frames: int, width: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one audio's cached states: num_layers × frames × width × dtype size (the
    safetensors header adds a few hundred bytes)."""
    return num_layers * frames * width * dtype.itemsize


class EncoderStateCache:
    """The target layers' states [L, T, D] of each audio, one file per key under `directory`.

    `encoder_model_id` and `layer_ids` name what the states are (checked on `get`); `dtype` is
    the stored dtype. `for_perception` fills them in from a `WhisperPerception`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        encoder_model_id: str,
        layer_ids: Sequence[int],
        dtype: torch.dtype = torch.bfloat16,
    ):
        self.directory = os.fspath(directory)
        self.dtype = dtype
        self.metadata = {
            "encoder_model_id": str(encoder_model_id),
            "layer_ids": json.dumps([int(i) for i in layer_ids]),
            "dtype": str(dtype).removeprefix("torch."),
        }
        os.makedirs(self.directory, exist_ok=True)

    @classmethod
    def for_perception(
        cls, directory: str | os.PathLike, perception, dtype: torch.dtype | None = None
    ) -> EncoderStateCache:
        """A cache of `perception`'s target layers, stored in `dtype` (default: the connector's)."""
        connector = perception.connector
        return cls(
            directory,
            encoder_model_id=perception.config.encoder_model_id,
            layer_ids=connector.target_layer_ids,
            dtype=dtype or connector.global_proj[1].weight.dtype,
        )

    def path(self, key: str) -> str:
        return os.path.join(self.directory, hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")

    def __contains__(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def put(self, key: str, states: torch.Tensor) -> None:
        """Store one audio's states [L, T, D] (cast to the cache's dtype)."""
        num_layers = len(json.loads(self.metadata["layer_ids"]))
        if states.dim() != 3 or states.size(0) != num_layers:
            raise ValueError(f"EncoderStateCache: states must be [{num_layers}, T, D], got {tuple(states.shape)}")
        tensor = states.detach().to(device="cpu", dtype=self.dtype).contiguous()
        temporary = self.path(key) + ".tmp"
        save_file({STATES_KEY: tensor}, temporary, metadata={**self.metadata, "key": key})
        os.replace(temporary, self.path(key))  # a reader never sees a half-written file

    def get(self, key: str) -> torch.Tensor:
        """One audio's states [L, T, D]; a file made for another encoder, layers or dtype is an error."""
        path = self.path(key)
        if not os.path.exists(path):
            raise KeyError(f"EncoderStateCache: no states for {key!r} in {self.directory}")
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        stored = {name: metadata.get(name) for name in self.metadata}
        if stored != self.metadata:
            raise ValueError(f"EncoderStateCache: {path} holds states of {stored}, this cache is {self.metadata}")
        return load_file(path)[STATES_KEY]

    def get_batch(self, keys: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """The states of `keys` as [L, N, T, D], what `WhisperPerception.forward(encoder_states=)` takes."""
        return torch.stack([self.get(key) for key in keys], dim=1).to(device=device)

    @torch.no_grad()
    def fill(
        self,
        perception,
        items: Iterable[tuple[str, torch.Tensor]],
        batch_size: int = 8,
        overwrite: bool = False,
    ) -> int:
        """Compute and store the states of every (key, features [n_mels, frames]) in `items` not
        yet cached (all with `overwrite`), `batch_size` audios per encoder call. Returns how many
        were computed."""
        layer_ids = perception.connector.target_layer_ids
        if json.dumps([int(i) for i in layer_ids]) != self.metadata["layer_ids"]:
            raise ValueError(
                f"EncoderStateCache: the perception reads layers {layer_ids}, this cache is {self.metadata}"
            )
        device = perception.whisper.conv1.weight.device
        computed = 0
        pending: list[tuple[str, torch.Tensor]] = []

        def flush() -> None:
            features = torch.stack([features for _, features in pending]).to(device)
            layers = perception.encoder_layer_outputs(features, layer_ids, dtype=self.dtype)
            states = torch.stack([layers[i] for i in layer_ids], dim=1)  # [N, L, T, D]
            for (key, _), state in zip(pending, states, strict=True):
                self.put(key, state)
            pending.clear()

        with torch.autocast(device.type, enabled=False):
            for key, features in items:
                if not overwrite and key in self:
                    continue
                pending.append((key, features))
                computed += 1
                if len(pending) == batch_size:
                    flush()
            if pending:
                flush()
        return computed
