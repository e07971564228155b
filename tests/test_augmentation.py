"""Augmentation: the random flips and shifts of training images, and the views test-time augmentation averages."""

import common

import torch


def test_flip_and_shift_move_pixels_without_changing_them():
    x = torch.randn(64, 1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    flipped = common.random_flip_and_shift(x, 0, generator)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    background = -10.0  # the black pixel, normalised: no pixel of x has it
    shifted = common.random_flip_and_shift(x, 2, generator, flip=False, background=background)
    # every shifted image is a translated copy: its 24x24 centre appears in the original
    for original, moved in zip(x, shifted, strict=True):
        centre = moved[:, 2:26, 2:26]
        assert any(
            torch.equal(original[:, 2 + dy : 26 + dy, 2 + dx : 26 + dx], centre)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        )
    assert (shifted == background).any()  # what moved in from outside the image is background


def test_tta_views_are_the_image_its_shifts_and_their_mirrors():
    x = torch.randn(3, 1, 28, 28)
    assert [v.data_ptr() for v in common.tta_views(x)] == [x.data_ptr()]
    views = common.tta_views(x, flip=True, max_shift=2, background=-5.0)
    assert len(views) == 2 * (1 + 4 * 2)
    unflipped, mirrored = views[:9], views[9:]
    for view, mirror in zip(unflipped, mirrored, strict=True):
        assert torch.equal(mirror, view.flip(3))
    assert torch.equal(unflipped[0], x)
    down, up, right, left = unflipped[1:5]  # moved by one pixel; the background fills the edge it leaves
    assert torch.equal(down[:, :, 1:], x[:, :, :-1]) and (down[:, :, 0] == -5).all()
    assert torch.equal(up[:, :, :-1], x[:, :, 1:]) and (up[:, :, -1] == -5).all()
    assert torch.equal(right[..., 1:], x[..., :-1]) and (right[..., 0] == -5).all()
    assert torch.equal(left[..., :-1], x[..., 1:]) and (left[..., -1] == -5).all()
    assert torch.equal(unflipped[5][:, :, 2:], x[:, :, :-2])  # then by two
