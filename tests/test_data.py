import torch

from tfkit.data import pad_rows


def test_pad_rows_puts_each_row_first_and_the_value_after_it():
    rows = [[5, 6, 7], [], [8], [9, 10]]
    assert torch.equal(pad_rows(rows, 0), torch.tensor([[5, 6, 7], [0, 0, 0], [8, 0, 0], [9, 10, 0]]))
    assert torch.equal(pad_rows([[1, 2], [3]], -100), torch.tensor([[1, 2], [3, -100]]))
    assert pad_rows([(4,), (5,)], 0).dtype == torch.long  # any sequences of ints
