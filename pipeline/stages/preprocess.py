"""CPU stage: read bytes through fsspec (or take them from the input row: pictures in a manifest column, a
WebDataset sample's members read by byte range), decode, tile images / sample and tile video frames; uint8 tiles out
(or, for compute.engine vllm-native, which tiles in vLLM, the decoded pictures and their sizes in `picture_sizes`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.errors import ErrorType, MediaError
from pipeline.io.image_column import cell_media
from pipeline.io.schema import PREPROCESS_SCHEMA, to_table
from pipeline.io.confine import InputRule, RefusedInput, input_rule
from pipeline.io.fetch import read_input
from pipeline.io.inputs import input_kind
from pipeline.io.storage import extension
from pipeline.io.webdataset import WDS_COLUMN, sample_media
from pipeline.media.decode import image_picture, image_tiles, video_pictures, video_tiles
from pipeline.media.sandbox import isolated
from pipeline.media.video import VIDEO_EXTENSIONS, looks_like_video
from pipeline.stages.base import Batch, Columns, as_list, require_columns


def job_input_rule(job: JobConfig) -> InputRule:
    """Where the job's samples may be read from (io/confine.py): its input's own location and `allowed_inputs`."""
    inventory = job.input is not None and input_kind(job.input, job.input_format) == "inventory"
    return input_rule(job.input, job.allowed_inputs, inventory=inventory)


class Preprocess:
    """Reads `id`, `uri` (and `uris`); adds the PREPROCESS_SCHEMA columns (`pixels`, tile counts, media facts,
    status); passes every other column through. A bad sample becomes a row with status error, never an exception.

    Decoding runs in a child process for the media `decode.isolate` names (video by default: decoders of
    containers and codecs are where crashes and hangs come from).

    Rows that carry their media (the job's `image_column`, a WebDataset sample's `__wds` byte ranges) are decoded
    from those bytes instead of reading `uri`; those columns end here (never written out)."""

    reads = ("id", "uri")

    @staticmethod
    def columns(job: JobConfig) -> Columns:
        """Reads id and uri; adds the tiles and media facts; drops a column that carried the pictures."""
        carried = (job.image_column,) if job.image_column else ()
        return Columns(reads=Preprocess.reads, adds=tuple(PREPROCESS_SCHEMA.names), drops=(*carried, WDS_COLUMN))

    def __init__(self, job: JobConfig) -> None:
        self.tiling = job.tiling
        self.video = job.video
        self.storage = dict(job.storage)
        self.http = job.http.model_dump()
        self.rule = job_input_rule(job)
        self.image_column = job.image_column
        decode = job.decode
        sandboxed = {"timeout_s": decode.timeout_s, "attempts": decode.attempts}
        self.pictures = job.compute.engine == "vllm-native"  # vLLM tiles them: whole pictures out
        image, video = (image_picture, video_pictures) if self.pictures else (image_tiles, video_tiles)
        self.image_tiles = isolated(image, **sandboxed) if decode.isolate == "all" else image
        self.video_tiles = isolated(video, **sandboxed) if decode.isolate in ("all", "video") else video

    def read(self, uri: str) -> bytes:
        """Bytes of one object where the job's rule allows its URI (else bad_input, nothing read: io/confine.py);
        missing objects and storage failures become classified errors."""
        try:
            return read_input(uri, rule=self.rule, storage=self.storage, http=self.http)
        except RefusedInput as err:
            raise MediaError(ErrorType.BAD_INPUT, f"refused: {err}") from None
        except FileNotFoundError:
            raise MediaError(ErrorType.NOT_FOUND, f"no such object: {uri}") from None
        except (OSError, ValueError) as err:
            raise MediaError(ErrorType.READ_ERROR, f"could not read {uri}: {type(err).__name__}: {err}") from None

    def _images(self, images: list[bytes]) -> dict[str, Any]:
        """Several images share the tile budget (max_tiles // n each, as InternVL 2.5 does) and the visual-token
        budget (an equal share each)."""
        budget = max(1, self.tiling.max_tiles // len(images))
        if self.pictures:
            done = [self.image_tiles(data, self.tiling, budget) for data in images]
            return dict(pictures=[d[0] for d in done], tiles_per_image=[d[1] for d in done], media_type="images",
                        width=done[0][0].shape[1], height=done[0][0].shape[0])
        tokens = self.tiling.max_tokens_per_sample // len(images) if self.tiling.max_tokens_per_sample else None
        done = [self.image_tiles(data, self.tiling, budget, tokens) for data in images]
        return dict(pixels=np.concatenate([d[0] for d in done]), tiles_per_image=[len(d[0]) for d in done],
                    media_type="image" if len(images) == 1 else "images", width=done[0][1], height=done[0][2])

    def _one(self, name: str, data: bytes) -> dict[str, Any]:
        """One image, or a video (by its name's extension or its container)."""
        if extension(name) in VIDEO_EXTENSIONS or looks_like_video(data):
            return self.video_tiles(data, self.video, self.tiling)
        if self.pictures:
            picture, tiles = self.image_tiles(data, self.tiling, self.tiling.max_tiles)
            return dict(pictures=[picture], tiles_per_image=[tiles], media_type="image", width=picture.shape[1],
                        height=picture.shape[0])
        pixels, width, height = self.image_tiles(data, self.tiling, self.tiling.max_tiles, self.tiling.max_tokens_per_sample)
        return dict(pixels=pixels, tiles_per_image=[len(pixels)], media_type="image", width=width, height=height)

    def prepare(self, uri: str, uris: list[str] | None = None,
                media: Callable[[], list[tuple[str, bytes]]] | None = None) -> dict[str, Any]:
        """Everything the CPU stage adds for one sample; failures become an error row. `media`: gives the sample's
        (name, bytes) where the input row carries them, in place of reading `uri` / `uris`."""
        start = time.perf_counter()
        row: dict[str, Any] = {f.name: None for f in PREPROCESS_SCHEMA}
        row.update(num_tiles=0, status="ok")
        try:
            if media is not None:
                given = media()
                row.update(self._images([d for _, d in given]) if len(given) > 1 else self._one(*given[0]))
            elif uris and len(uris) > 1:
                row.update(self._images([self.read(u) for u in uris]))
            else:
                row.update(self._one(uri, self.read(uri)))
            if self.pictures:  # the tiles the cards would make (vLLM's processor makes its own)
                pictures = row.pop("pictures")
                row.update(num_tiles=sum(row["tiles_per_image"]), picture_sizes=[list(p.shape[:2]) for p in pictures],
                           pixels=b"".join(np.ascontiguousarray(p).tobytes() for p in pictures))
            else:
                row["num_tiles"] = len(row["pixels"])
                row["pixels"] = row["pixels"].tobytes()
        except MediaError as err:
            row.update(pixels=None, status="error", error_type=str(err.error_type), error_message=str(err))
        row["preprocess_ms"] = (time.perf_counter() - start) * 1000.0
        return row

    def carried(self, batch: Batch) -> tuple[str | None, list[Callable[[], list[tuple[str, bytes]]]] | None]:
        """The column that carries each row's media, and per row what reads them (None: read `uri`)."""
        if WDS_COLUMN in batch:
            return WDS_COLUMN, [partial(sample_media, cell, self.storage) for cell in batch[WDS_COLUMN]]
        if self.image_column and self.image_column in batch:
            return self.image_column, [partial(cell_media, cell, self.image_column) for cell in batch[self.image_column]]
        return None, None

    def __call__(self, batch: Batch) -> pa.Table:
        require_columns(batch, "preprocess", self.reads)
        uris = batch.get("uris")
        column, media = self.carried(batch)
        rows = [self.prepare(str(u), as_list(uris[i]) if uris is not None else None, media[i] if media else None)
                for i, u in enumerate(batch["uri"])]
        added = {f.name: [r[f.name] for r in rows] for f in PREPROCESS_SCHEMA}
        passthrough = {k: v for k, v in batch.items() if k not in added and k != column}
        return to_table({**added, **passthrough}, PREPROCESS_SCHEMA)
