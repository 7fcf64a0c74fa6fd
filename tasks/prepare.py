"""Stage `prepare`: build the source and every target dataset with fixed, stratified splits."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from tasks.config.params import TEXT_BACKBONES, DatasetSpec, Params, SourceSpec
from tasks.data import tokens
from tasks.data.datasets import Labelled, class_counts, save_splits, small_validation
from tasks.data.sources import (
    BuiltDataset,
    build_splits,
    cuts_test,
    datasets,
    decoding,
    files_read,
    unite,
)
from tasks.frame import stage_command
from tasks.recording.recorder import Recorder, stage_tags
from tasks.workspace import files
from tasks.workspace.layout import Layout

log = logging.getLogger(__name__)


def prepare(params: Params, layout: Layout, recorder: Recorder) -> dict[str, dict[str, int]]:
    """Write data/prepared/<dataset>/{train,val,test}.npz and meta.json; return split sizes.
    A source gets no test.npz unless it ships test arrays (pretraining never scores one)."""
    named = datasets(params)
    joint = {name: spec for name, spec in params.sources.items() if spec.kind == "joint"}
    root = layout.prepared(next(iter(named))).parent
    files.check_writable(root)
    sizes = {}
    read = [path for spec, _ in named.values() for path in files_read(spec)]
    with recorder.child("prepare", tags=stage_tags("prepare"), inputs=read) as stage:
        # Build and check every dataset before writing any, so that a bad one changes nothing.
        how = decoding(params, layout)
        built = {
            name: build_splits(spec, params.split, key, cuts_test(key), how)
            for name, (spec, key) in named.items()
        }
        for name, spec in joint.items():
            built[name] = unite({m: built[m] for m in spec.of}, f"sources.{name}")
            named[name] = (spec, f"sources.{name}")
        # what every dataset's meta says of its token ids, or of off-the-shelf weights
        shared: dict[str, Any] = {}
        if params.model.backbone in TEXT_BACKBONES:
            built, shared = _tokenized(params, built, layout)
        elif params.model.pretrained_path is not None:  # timm weights: pretrain checks them
            shared = _weights_origin(params.model.pretrained_path, layout)
        for name, data in built.items():
            meta = _meta(name, named[name][0], data) | shared
            sizes[name] = meta["sizes"]
            save_splits(layout.prepared(name), data.splits, meta)
            # an older run's split this one no longer writes (the test.npz once cut from the
            # source) must not pass for this run's
            keep = {f"{s}.npz" for s in data.splits} | {"meta.json"}
            if "tokens" in shared and name in params.sources:
                keep.add(tokens.TOKENIZER_FILE)
            files.prune(layout.prepared(name), keep=keep)
            if note := small_validation(meta["val_class_counts"]):
                log.warning("%s: %s", name, note)
            log.info("prepared %s: %s", name, sizes[name])
        files.prune(root, keep=set(named))  # datasets no longer in params
        stage.log(
            params={"datasets": ",".join(named)},
            metrics={f"{n}/{s}_size": v for n, split in sizes.items() for s, v in split.items()},
        )
    return sizes


def _tokenized(
    params: Params, built: dict[str, BuiltDataset], layout: Layout
) -> tuple[dict[str, BuiltDataset], dict[str, Any]]:
    """Every split's texts as token ids (N, max_tokens), by the source's tokenizer (trained on
    its training texts) or the pretrained encoder's own, which is written beside the source's
    splits; and what the datasets' meta says of them."""
    cfg, pretrained = params.text, params.model.pretrained_path  # set: model.backbone pretrained
    if pretrained is not None:
        from tasks.models.pretrained import read_pretrained_dir  # transformers: a slow import

        _warn_outside_raw(pretrained, layout)
        encoder = read_pretrained_dir(pretrained)
        tokenizer = Tokenizer.from_str(encoder.tokenizer_json)
        pad_id, kind = encoder.pad_id, "pretrained"
        # the weights' hash: pretrain checks that it still reads these very weights, and DVC
        # reruns it when they change (this stage's output changes with the hash)
        origin = {"pretrained": {"path": str(pretrained), "sha256": encoder.weights_sha256}}
    else:
        tokenizer = tokens.train_tokenizer(built[_text_source(params)].splits["train"].x, cfg)
        pad_id, kind, origin = tokenizer.token_to_id("[PAD]"), cfg.tokenizer, {}
    encoded = {
        name: dataclasses.replace(
            data,
            splits={
                split: Labelled(tokens.encode(tokenizer, part.x, cfg.max_tokens, pad_id), part.y)
                for split, part in data.splits.items()
            },
        )
        for name, data in built.items()
    }
    tokens.save(tokenizer, layout.prepared(_text_source(params)) / tokens.TOKENIZER_FILE)
    return encoded, {"tokens": tokens.describe(tokenizer, pad_id, kind), **origin}


def _text_source(params: Params) -> str:
    """A text study's one source (params allow one): its tokenizer makes every dataset's ids."""
    return next(iter(params.sources))


def _warn_outside_raw(pretrained: Path, layout: Layout) -> None:
    if not pretrained.resolve().is_relative_to((layout.root / "data" / "raw").resolve()):
        log.warning(
            "model.pretrained_path %s is outside data/raw: DVC does not watch it, so "
            "`dvc repro` will not notice new weights there (pretrain refuses them until "
            "prepare runs again)",
            pretrained,
        )


def _weights_origin(pretrained: Path, layout: Layout) -> dict[str, Any]:
    """Off-the-shelf image weights' path and hash: pretrain checks that it still reads these
    very weights, and DVC reruns it when they change (this stage's output changes with the
    hash)."""
    _warn_outside_raw(pretrained, layout)
    return {"pretrained": {"path": str(pretrained), "sha256": files.sha256(pretrained)}}


def _meta(name: str, spec: DatasetSpec | SourceSpec, data: BuiltDataset) -> dict:
    num_classes = len(data.classes)
    return {
        "name": name,
        "spec": spec.model_dump(mode="json"),
        # original label of each class index 0..K-1: JSON ints for integer labels, else strings
        "classes": data.classes,
        "num_classes": num_classes,
        # (C, L); images: (C, H, W); texts: (max_tokens,)
        "input_shape": list(data.splits["train"].x.shape[1:]),
        "sizes": {split: len(part) for split, part in data.splits.items()},
        "test_source": data.test_source,  # "shipped" with the data, "cut" from it, or "none"
        # the content of every file read, for the report and the records: DVC does not watch a
        # file outside the workspace (Debian's fortunes), so after a package update it takes
        # `dvc repro -f prepare` to see the new data; this output then changes, and every stage
        # after it reruns
        "files_md5": {
            str(path): hashlib.md5(path.read_bytes()).hexdigest() for path in files_read(spec)
        },
        "train_class_counts": class_counts(data.splits["train"], num_classes),
        "val_class_counts": class_counts(data.splits["val"], num_classes),
    }


def main(argv: list[str] | None = None) -> None:
    stage_command(__doc__, prepare, argv)


if __name__ == "__main__":
    main()
