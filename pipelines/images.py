"""A (small) image corpus decoded into memory, through the pipeline's own readers and decoding.

For evaluation, judges and tests: held-out sets of thousands of images, not training corpora (those
stream through Ray Data). Every source `flextok tokenize --input` takes works here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    images: Any  # uint8 (N, 3, S, S)
    labels: Any  # int64 (N,), -1 where unknown
    captions: list[str | None]
    keys: list[str]
    class_names: list[str] | None
    num_errors: int


def read_corpus(url: str, image_size: int, *, max_images: int | None = None,
                storage_options: dict | None = None) -> Corpus:
    """Decode up to `max_images` images of a corpus to uint8 (N, 3, S, S), with labels and captions."""
    import numpy as np
    import torch

    from pipelines.decode import DecodeConfig, DecodeError, decode_image
    from pipelines.sources import effective_storage_options, read_shard, resolve_inputs

    opts = effective_storage_options(url, storage_options)
    plan = resolve_inputs(url, opts)
    cfg = DecodeConfig(image_size=image_size)
    pixels, labels, captions, keys, errors = [], [], [], [], 0
    for shard in plan.shards:
        for table in read_shard(shard, opts):
            for row in table.to_pylist():
                if row["index"] < 0:
                    continue
                if max_images is not None and len(pixels) >= max_images:
                    break
                if row["error"] is not None:
                    errors += 1
                    continue
                try:
                    array, _, _ = decode_image(row["image"], cfg)
                except DecodeError:
                    errors += 1
                    continue
                pixels.append(array)
                labels.append(-1 if row["label"] is None else int(row["label"]))
                captions.append(row["caption"])
                keys.append(row["key"])
        if max_images is not None and len(pixels) >= max_images:
            break
    if not pixels:
        raise ValueError(f"--data {url}: no decodable images ({errors} errors)")
    if errors:
        log.warning("%s: %d samples could not be read or decoded and were skipped", url, errors)
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    names = list(plan.class_names) or None
    return Corpus(images=images, labels=torch.tensor(labels, dtype=torch.long), captions=captions, keys=keys,
                  class_names=names, num_errors=errors)


# Helpers ------------------------------------------------------------------------------------------
