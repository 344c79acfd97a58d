"""focusfix_core/viz.py heat_overlay: what its docstring promises and the property tests let change (found by
mutation testing): per-image scaling, inf drawn as 0, values above vmax drawn as vmax."""
import torch

from focusfix_core import viz

RED, BLUE = (torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1) for c in ([1, 0, 0], [0, 0, 1]))


def test_each_images_map_is_scaled_to_its_own_range():
    H = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    I = torch.zeros(2, 3, 2, 2)
    out = viz.heat_overlay(I, torch.stack([H, 100 * H]), alpha=1.0)
    torch.testing.assert_close(out[0], out[1])
    assert torch.equal(out[:, :, 0, 0], BLUE[0, :, 0, 0].expand(2, 3)) and torch.equal(out[:, :, 0, 1], RED[0, :, 0, 0].expand(2, 3))


def test_an_inf_value_draws_as_zero_and_the_rest_keeps_its_range():
    H = torch.tensor([[[0.0, 1.0], [float("inf"), 0.5]]])
    out = viz.heat_overlay(torch.zeros(1, 3, 2, 2), H, alpha=1.0)[0]
    torch.testing.assert_close(out[:, 0, 1], RED.flatten())   # 1 is still the top of the range: red
    torch.testing.assert_close(out[:, 1, 0], BLUE.flatten())  # inf drew as 0: blue
    torch.testing.assert_close(out[:, 1, 1], torch.tensor([0.5, 1.0, 0.5]))  # 0.5: mid
    neg = viz.heat_overlay(torch.zeros(1, 3, 2, 2), torch.tensor([[[0.0, -1.0], [-float("inf"), -0.5]]]), alpha=1.0)
    torch.testing.assert_close(neg[0, :, 1, 0], RED.flatten())  # -inf drew as 0, the top of [-1, 0]: red


def test_with_vmax_values_above_it_draw_as_vmax_whatever_alpha():
    I = torch.full((1, 3, 2, 2), 0.5)
    at = viz.heat_overlay(I, torch.full((1, 2, 2), 0.25), alpha=0.5, vmax=0.25)
    above = viz.heat_overlay(I, torch.full((1, 2, 2), 1.0), alpha=0.5, vmax=0.25)
    torch.testing.assert_close(above, at)
    torch.testing.assert_close(at, (0.5 * I + 0.5 * RED).expand_as(I))


def test_plot_curves_draws_a_rising_series_rising():
    img = viz.plot_curves({"reward": [0.0, 1.0]})  # one band: from (8, bottom) up to (width - 8, top)
    red = (img[0] > 0.7) & (img[1] < 0.5) & (img[2] < 0.5)  # the first series' colour (230, 80, 60)
    left_rows = red[:, 10].nonzero().flatten()
    right_rows = red[:, 500].nonzero().flatten()
    assert left_rows.numel() and right_rows.numel()
    assert left_rows.min() > 200 and right_rows.max() < 60  # low value near the bottom, high near the top


def test_plot_curves_writes_each_series_legend_in_its_colour_above_its_curve():
    img = viz.plot_curves({"loss": [5.0] * 10})  # flat: the line lies on the band's bottom, the legend at the top
    red = (img[0] > 0.7) & (img[1] < 0.5) & (img[2] < 0.5)
    assert red[:13].any() and not red[13:240].any()
