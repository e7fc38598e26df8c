"""``scaling-train`` as a later release would run it: the train group has one more key, declared in the run identity
(``conf/train_schema.py``). ``extended_schema()`` applies it inside a test; ``python -m tests.extended_schema
<scaling-train args>`` runs the installed command's entry point with it (the key at its baseline, 0.0)."""

from __future__ import annotations

import contextlib
import dataclasses

from hydra.core.config_store import ConfigStore

from scaling_lab.conf import train_schema as schema

NAME = "label_smoothing"


@contextlib.contextmanager
def extended_schema(key: schema.Key | None = schema.Key(baseline=0.0), default: float = 0.0):
    """TrainConf with a float ``train.label_smoothing`` (default ``default``); ``key``: how it enters the run id
    (None: declared operational; the string "undeclared": declared nowhere)."""
    train = dataclasses.make_dataclass("TrainConf", [(NAME, float, dataclasses.field(default=default))],
                                       bases=(schema.TrainConf,))
    app = dataclasses.make_dataclass("TrainAppConf", [("train", train, dataclasses.field(default_factory=train))],
                                     bases=(schema.TrainAppConf,))
    store = ConfigStore.instance()
    store.store(name="train_schema", node=app)
    if key is None:
        schema.OPERATIONAL["train"].add(NAME)
    elif key != "undeclared":
        schema.RUN_IDENTITY["train"][NAME] = key
    try:
        yield
    finally:
        store.store(name="train_schema", node=schema.TrainAppConf)
        schema.RUN_IDENTITY["train"].pop(NAME, None)
        schema.OPERATIONAL["train"].discard(NAME)


if __name__ == "__main__":
    from scaling_lab.conf.commands import train

    with extended_schema():
        train()
