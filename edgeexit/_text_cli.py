"""The CLI's text side: export the zoo's bert-exits (MiniLM with an exit per layer)."""

from __future__ import annotations

from pathlib import Path

import click

from ._logging import logger


def export_bert_cli(output: Path, weights: Path | None, train: bool, seed: int, thresholds: tuple[float, ...],
                    policy: str) -> None:
    """``edgeexit export bert-exits``: MiniLM-L6 with exit heads trained here (--train, on Debian's
    fortunes) or loaded from --weights (heads saved by a --train run)."""
    from .zoo.bert_exits import bert_exits, export_bert_exits, load_heads, save_heads, train_bert_exits
    from .zoo.fortunes import CATEGORIES, fortunes_splits

    if thresholds and len(thresholds) != 5:
        raise click.UsageError("bert-exits has 5 early exits: pass --threshold five times, or none (the exits then "
                               "stay disabled until calibrated)")
    if weights is not None:
        model = load_heads(bert_exits(classes=len(CATEGORIES)), weights)
    elif train:
        model, _ = train_bert_exits(fortunes_splits(seed), seed=seed, log=logger.info)
        saved = save_heads(model, output.parent / f"{output.name.removesuffix('.eexit')}.heads.pt")
        click.echo(f"saved the trained exit heads to {saved} (export again with --weights {saved})")
    else:
        raise click.UsageError("zoo model 'bert-exits' needs its exit heads: pass --weights FILE.pt or --train")
    export_bert_exits(model, output, CATEGORIES, thresholds=list(thresholds) or None, policy=policy, log=logger.info)
