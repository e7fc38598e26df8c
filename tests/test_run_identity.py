"""Run identity: the ids of a fixed set of configurations are pinned (tests/golden/run_ids.json)."""

import json

from tests.run_id_cases import GOLDEN, ids


def test_pinned_run_ids_do_not_move():
    moved = []
    for case in json.loads(GOLDEN.read_text())["cases"]:
        now = ids(case["overrides"])
        if now != {"run_id": case["run_id"], "trunk_id": case["trunk_id"]}:
            moved.append(f"{case['case']} {case['overrides']}: {case['run_id']}/{case['trunk_id']} -> "
                         f"{now['run_id']}/{now['trunk_id']}")
    assert not moved, (f"{len(moved)} pinned run ids moved: every user's finished runs of these configurations would "
                       "train again. Keep them (a new key needs a baseline in conf/train_schema.py's RUN_IDENTITY), "
                       "or regenerate the table on purpose and say why in the commit and CHANGELOG.md:\n"
                       + "\n".join(moved[:20]))
