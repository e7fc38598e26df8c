"""Every ``scaling-*`` command: its name, its config, the function that runs it, the bad-input exceptions it
raises besides ``UserError`` and the extra it needs beyond the torch-free base (``scaling_lab.conf.command``). The
entry points of ``pyproject.toml`` name these; a command's own module (torch, pandas, matplotlib) is imported only
once its config is composed, so that ``--help`` and a mistyped key answer at once."""

from __future__ import annotations

from scaling_lab.conf import command

train = command("scaling-train", "train", "scaling_lab.pipeline.train:train_command", errors=(FileNotFoundError,),
                schema="scaling_lab.conf.train_schema", extra="train")
prepare = command("scaling-prepare", "prepare", "scaling_lab.pipeline.prepare:prepare_command",
                  schema="scaling_lab.conf.train_schema", extra="train")
sweep_status = command("scaling-sweep-status", "status", "scaling_lab.pipeline.sweep:status_command")
latency = command("scaling-latency", "latency_cli", "scaling_lab.pipeline.latency:run_latency",
                  errors=(FileNotFoundError,), help="latency", extra="train")
select = command("scaling-select", "select", "scaling_lab.pipeline.select:run", errors=(FileNotFoundError,),
                 extra="train")
verify = command("scaling-verify", "verify", "scaling_lab.pipeline.verify:run", errors=(FileNotFoundError,),
                 extra="train")
quantize = command("scaling-quantize", "quantize", "scaling_lab.pipeline.quantize:run", errors=(FileNotFoundError,),
                   extra="serve")
speculate = command("scaling-speculate", "speculate", "scaling_lab.pipeline.speculate:run",
                    errors=(FileNotFoundError,), extra="serve")
export = command("scaling-export", "export", "scaling_lab.pipeline.export:run", errors=(FileNotFoundError,),
                 extra="train")
fit = command("scaling-fit", "fit", "scaling_lab.fit.fitting.cli:run", errors=(FileNotFoundError,),
              schema="scaling_lab.conf.fit_schema")
plan = command("scaling-plan", "plan", "scaling_lab.fit.plan.cli:plan_command", errors=(FileNotFoundError,))
report = command("scaling-report", "report", "scaling_lab.fit.report:report_command", errors=(OSError, KeyError))
