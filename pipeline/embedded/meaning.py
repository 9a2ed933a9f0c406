"""Held-out samples of the tiny model's world, the jobs that ask about them, and how right the answers are.

Used by `internvl-batch demo` and tests/integration/test_meaning.py: samples are drawn fresh (`world`, a seed no
training run uses), written as files with a manifest, run through the real pipeline (`run_job`), and the output rows
compared with the truth. Nothing here knows the model.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.embedded import world as W

EVAL_SEED = 20261202  # training draws from np.random.default_rng([seed, kind, index]) with small seeds
IMAGE_QUESTIONS = [W.CAPTION, W.WHAT_SHAPE, W.WHAT_COLOR, W.WHAT_BACKGROUND]
VIDEO_QUESTIONS = [W.VIDEO_CAPTION, W.WHICH_WAY]
YES_NO = {f"is_{s}": W.is_there(s) for s in W.SHAPES} | {f"is_{c}": W.is_color(c) for c in W.COLORS}


@dataclass
class EvalSet:
    """Files written under `folder` and, per manifest row, what the answers must be."""

    folder: Path
    truth: dict[str, dict[str, str]] = field(default_factory=dict)  # row id -> question -> answer
    labels: dict[str, dict[str, bool]] = field(default_factory=dict)  # image row id -> criterion -> yes?
    kinds: dict[str, str] = field(default_factory=dict)  # row id -> image | pair | video
    tiles: dict[str, int] = field(default_factory=dict)  # image row id -> tiles it was drawn for
    rows: list[dict] = field(default_factory=list)


def draw_eval_set(folder: str | Path, *, images: int, pairs: int, videos: int, seed: int = EVAL_SEED) -> EvalSet:
    """Images covering every tile count (1..13) in turn, both formats, colours / shapes / backgrounds cycled so each
    appears; pairs; videos (every direction in turn). Writes the files and the manifests singles.jsonl (images and
    videos) and pairs.jsonl, whose rows carry their own questions (vqa jobs), and images.jsonl (score jobs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = EvalSet(folder)
    rng = np.random.default_rng(seed)
    colors, backgrounds = list(W.COLORS), list(W.BACKGROUNDS)
    for i in range(images):
        tiles = W.TILE_COUNTS[i % len(W.TILE_COUNTS)]
        # images i and i + 9 have the same tile count and another shape and colour (the sabotage test swaps them)
        d = W.draw_image(rng, tiles=tiles, shape=W.SHAPES[(i + i // 9) % 3], color=colors[(i + 2 * (i // 9)) % 4],
                         background=backgrounds[(i // 2) % 3], fmt=("jpeg", "png")[i % 2])
        name = f"image-{i:03d}.{'jpg' if d.format == 'jpeg' else 'png'}"
        (folder / name).write_bytes(d.data)
        rid = f"image-{i:03d}"
        out.rows.append({"id": rid, "uri": name, "questions": IMAGE_QUESTIONS})
        out.truth[rid] = d.answers
        out.labels[rid] = {k: d.yes_no[q] for k, q in YES_NO.items()}
        out.kinds[rid], out.tiles[rid] = "image", tiles
    for i in range(pairs):
        pair = W.draw_pair(rng, answer=("Image-1", "Image-2")[i % 2])
        names = []
        for j, im in enumerate(pair.images):
            names.append(f"pair-{i:03d}-{j + 1}.{'jpg' if im.format == 'jpeg' else 'png'}")
            (folder / names[-1]).write_bytes(im.data)
        rid = f"pair-{i:03d}"
        out.rows.append({"id": rid, "uris": names, "questions": [pair.prompt]})
        out.truth[rid] = pair.answers
        out.kinds[rid] = "pair"
    for i in range(videos):
        v = W.draw_video(rng, direction=W.DIRECTIONS[i % 4])
        name = f"video-{i:03d}.mp4"
        (folder / name).write_bytes(v.data)
        rid = f"video-{i:03d}"
        out.rows.append({"id": rid, "uri": name, "questions": VIDEO_QUESTIONS})
        out.truth[rid] = v.answers
        out.kinds[rid] = "video"
    write_manifest(folder / "singles.jsonl", [r for r in out.rows if "uri" in r])
    write_manifest(folder / "pairs.jsonl", [r for r in out.rows if "uris" in r])
    write_manifest(folder / "images.jsonl", [{"id": r["id"], "uri": r["uri"]} for r in out.rows
                                            if out.kinds[r["id"]] == "image"])
    return out


def write_manifest(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def vqa_job(input_url: str, output_url: str, model: str, **extra) -> dict:
    return {"task": "vqa", "input": input_url, "output": output_url, "model": model,
            "generation": {"max_new_tokens": 12}, "compute": {"batch_size": 8}, "overwrite": True, **extra}


def score_job(input_url: str, output_url: str, model: str, *, keep: str = "red", **extra) -> dict:
    """Every yes/no question of the world as a criterion; the filter keeps shapes of colour `keep`."""
    criteria = [{"name": k, "prompt": q, "labels": ["yes", "no"]} for k, q in YES_NO.items()]
    for c in criteria:
        if c["name"] == f"is_{keep}":
            c["filter"] = {"min_score": 0.5}
    return {"task": "score", "input": input_url, "output": output_url, "model": model, "criteria": criteria,
            "compute": {"batch_size": 8}, "overwrite": True, **extra}


def _sample_id(row: dict) -> str:
    return row.get("sample_id") or row["id"].split("#")[0]


def answer_metrics(rows: list[dict], truth: EvalSet) -> dict[str, float]:
    """Exact-match accuracy per question kind: caption, shape, color, background, pair, video_caption, direction."""
    names = {W.CAPTION: "caption", W.WHAT_SHAPE: "shape", W.WHAT_COLOR: "color", W.WHAT_BACKGROUND: "background",
             W.VIDEO_CAPTION: "video_caption", W.WHICH_WAY: "direction"}
    hits: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        sid = _sample_id(row)
        q = row["question"]
        kind = "pair" if truth.kinds[sid] == "pair" else names[q]
        hits[kind].append(row["status"] == "ok" and (row["response"] or "").strip() == truth.truth[sid][q])
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())} | {f"n_{k}": len(v) for k, v in sorted(hits.items())}


def roc_auc(scores: list[float], labels: list[bool]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def score_metrics(rows: list[dict], truth: EvalSet, *, keep: str = "red") -> dict[str, float]:
    """ROC AUC of every criterion's score, pooled over criteria too; precision / recall of the `keep` filter."""
    out: dict[str, float] = {}
    pooled_s, pooled_y = [], []
    for name in YES_NO:
        s = [row[f"score_{name}"] for row in rows]
        y = [truth.labels[_sample_id(row)][name] for row in rows]
        out[f"auc_{name}"] = roc_auc(s, y)
        pooled_s += s
        pooled_y += y
    out["auc_pooled"] = roc_auc(pooled_s, pooled_y)
    passed = np.asarray([bool(row["passed"]) for row in rows])
    actual = np.asarray([truth.labels[_sample_id(row)][f"is_{keep}"] for row in rows])
    out["filter_precision"] = float((passed & actual).sum() / max(1, passed.sum()))
    out["filter_recall"] = float((passed & actual).sum() / max(1, actual.sum()))
    out["n_scored"] = len(rows)
    return out


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" if not k.startswith("n_") else f"{k} {v}" for k, v in metrics.items())


def show_rows(rows: list[dict], truth: EvalSet, echo: Callable[[str], None], *, limit: int = 8) -> None:
    """A few rows next to the truth."""
    for row in sorted(rows, key=lambda r: r["id"])[:limit]:
        sid = _sample_id(row)
        want = truth.truth[sid][row["question"]]
        got = (row["response"] or "").strip()
        echo(f"  {sid:<10} {row['question']:<32} {got!r:<42} truth {want!r} {'ok' if got == want else 'WRONG'}")
