"""What a run prints while it trains: the progress bar and the model summary (Lightning's, minus two misreadings).

- :class:`ProgressBar`: Lightning's rich bar titles a step-limited run (``max_epochs=-1``, our pretraining) "Epoch
  4/-2"; here it reads "Epoch 4 (max_steps 1000)".
- :class:`ModelSummary`: Lightning counts FLOPs only for a model with an ``example_input_array`` (ours take a
  ``Batch``), so its summary printed "FLOPs 0" for every layer and "Total FLOPs: 0"; here the FLOPs column and total
  appear only when they were counted (``ThroughputLogger`` logs the measured FLOPs of a training step).
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import RichModelSummary, RichProgressBar
from pytorch_lightning.utilities.model_summary import get_human_readable_count


class ProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch}"
        if self.trainer.max_steps is not None and self.trainer.max_steps > 0:
            text += f" (max_steps {self.trainer.max_steps})"
        return f"{text:{len(self.validation_description)}}"


class ModelSummary(RichModelSummary):
    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if not total_flops:
            summary_data = [(name, values) for name, values in summary_data if name != "FLOPs"]
        from rich import get_console
        from rich.table import Table

        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in summary_data:
            table.add_column(name, justify="right" if name in ("Params", "FLOPs") else "left")
        for row in zip(*(values for _, values in summary_data), strict=True):
            table.add_row(*row)
        lines = [
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", f"{model_size:,.3f}"),
            ("Modules in train / eval mode", f"{total_training_modes['train']} / {total_training_modes['eval']}"),
        ]
        if total_flops:
            lines.append(("Total FLOPs", get_human_readable_count(int(total_flops))))
        grid = Table.grid(expand=True)
        grid.add_column()
        for name, value in lines:
            grid.add_row(f"[bold]{name}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)
