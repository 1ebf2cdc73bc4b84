"""The training loop reads losses back from the device only on the steps it logs (issue 22: no
host sync per step), with the same numbers as reading every step."""

from x_transformers.training import loop
from train_helpers import TINY, cli, train_losses


def test_the_loop_reads_the_device_once_per_logged_step_and_logs_the_same_losses(tmp_path, monkeypatch):
    reads = []
    real = loop.Trainer.read

    def counted(self, recs):
        reads.append(len(recs))
        return real(self, recs)

    every = tmp_path / "every"
    assert cli("train", *TINY, "--max-steps", "6", "--out", every) == 0
    monkeypatch.setattr(loop.Trainer, "read", counted)
    lazy = tmp_path / "lazy"
    args = [a if a != "1" or i == 0 or TINY[i - 1] != "--log-every" else "3" for i, a in enumerate(TINY)]
    assert cli("train", *args, "--max-steps", "6", "--out", lazy) == 0
    # 6 steps, logged at 3 and 6: two reads of 3 steps each (and an empty final read does no sync)
    assert [n for n in reads if n] == [3, 3]
    logged = train_losses(lazy)
    assert len(logged) == 2
    assert logged == [train_losses(every)[2], train_losses(every)[5]]
