"""The ``wandb`` logger (``train.loggers: [wandb]``): Weights & Biases, offline by default.

The run goes to ``RUN_DIR/wandb/offline-run-*`` (``wandb sync`` uploads it later) unless
``WANDB_MODE`` says otherwise (``online`` needs ``wandb login``); ``WANDB_PROJECT`` names the
project (default ``alignkit``). It logs the run's resolved config (``RUN_DIR/config.yaml``),
``train/<metric>`` per logged step, ``eval/<metric>`` per evaluation, and at the end the
final results as the run summary and as a table (``final_results``). A resumed run continues
the same wandb run (its id comes from the run folder).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from alignkit.core.callbacks import Callback, Record
from alignkit.core.errors import MissingPackage
from alignkit.core.registry import LOGGERS


@LOGGERS.register("wandb")
class WandbLogger(Callback):
    def __init__(self, *, run_dir: Path) -> None:
        self.wandb = self.check()
        self.run_dir = Path(run_dir)
        self.run: Any = None

    @staticmethod
    def check() -> Any:
        """The wandb module, or :class:`MissingPackage` (config checks call this before any model is built)."""
        try:
            import wandb
        except ImportError:
            raise MissingPackage("train.loggers names 'wandb', which needs the wandb package: "
                                 "pip install 'alignkit[wandb]' (or pip install wandb)") from None
        return wandb

    def _config(self, trainer: Any) -> dict[str, Any]:
        saved = self.run_dir / "config.yaml"  # the whole recipe; a teacher pre-training stage has only its train section
        if saved.is_file():
            return OmegaConf.to_container(OmegaConf.load(saved))  # type: ignore[return-value]
        return {"train": dataclasses.asdict(trainer.cfg)}

    def on_fit_start(self, trainer: Any) -> None:
        run_id = hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = self.wandb.init(
            dir=str(self.run_dir), id=run_id, resume="allow", name=self.run_dir.name,
            project=os.environ.get("WANDB_PROJECT", "alignkit"), mode=os.environ.get("WANDB_MODE", "offline"),
            config=self._config(trainer),
            # console capture would wrap the progress bar; system sampling would take CPU from training
            settings=self.wandb.Settings(console="off", x_disable_stats=True, save_code=False, quiet=True),
        )

    def _log(self, prefix: str, values: Record, step: int) -> None:
        numbers = {f"{prefix}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
        self.run.log(numbers, step=step)

    def on_step_end(self, trainer: Any, record: Record | None) -> None:
        if record is not None:
            self._log("train", record, trainer.step)

    def on_eval(self, trainer: Any, results: dict[str, float]) -> None:
        self._log("eval", results, trainer.step)

    def on_interrupt(self, trainer: Any, checkpoint: Path) -> None:
        self.run.finish()

    def on_fit_end(self, trainer: Any, results: dict[str, float]) -> None:
        final = {k: v for k, v in results.items() if isinstance(v, (int, float))}
        self.run.summary.update({f"final/{k}": v for k, v in final.items()})
        self.run.log({"final_results": self.wandb.Table(columns=["metric", "value"], data=[[k, v] for k, v in final.items()])})
        self.run.finish()
