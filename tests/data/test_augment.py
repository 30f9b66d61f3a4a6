import numpy as np
import pytest

from ffcompile.data import jitter, random_shifts, shift_images

ALL_SHIFTS = [(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)]


@pytest.fixture
def images():
    return np.random.default_rng(0).random((6, 784), dtype=np.float32)


def test_zero_shift_is_identity(images):
    out = shift_images(images, np.zeros(6, int), np.zeros(6, int))
    np.testing.assert_array_equal(out, images)
    assert out.dtype == images.dtype and out.shape == images.shape
    assert out is not images


@pytest.mark.parametrize("dx,dy", ALL_SHIFTS)
def test_shift_then_inverse_restores_interior(images, dx, dy):
    back = shift_images(shift_images(images, dx, dy), -dx, -dy)
    interior = (slice(None), slice(2, 26), slice(2, 26))
    np.testing.assert_array_equal(back.reshape(-1, 28, 28)[interior], images.reshape(-1, 28, 28)[interior])


def test_single_pixel_moves_right_and_down_for_positive_shifts():
    image = np.zeros((1, 28, 28), dtype=np.uint8)
    image[0, 10, 12] = 255  # row 10, column 12
    for dx, dy in ALL_SHIFTS:
        out = shift_images(image.reshape(1, 784), [dx], [dy]).reshape(28, 28)
        assert out[10 + dy, 12 + dx] == 255 and out.sum() == 255


def test_uncovered_pixels_are_zero_and_out_of_frame_content_is_dropped():
    ones = np.ones((1, 784), dtype=np.float32)
    out = shift_images(ones, [2], [-1]).reshape(28, 28)
    assert (out[:, :2] == 0).all() and (out[27, :] == 0).all()
    assert out.sum() == 26 * 27
    assert not shift_images(ones, [28], [0]).any()


def test_each_image_gets_its_own_shift(images):
    rng = np.random.default_rng(1)
    dx, dy = random_shifts(rng, len(images))
    batched = shift_images(images, dx, dy)
    for i in range(len(images)):
        np.testing.assert_array_equal(batched[i], shift_images(images[i : i + 1], dx[i], dy[i])[0])


def test_random_shifts_cover_the_25_shifts_and_are_seeded():
    dx, dy = random_shifts(np.random.default_rng(2), 2000)
    assert set(zip(dx.tolist(), dy.tolist())) == set(ALL_SHIFTS)
    again = random_shifts(np.random.default_rng(2), 2000)
    np.testing.assert_array_equal(dx, again[0])
    np.testing.assert_array_equal(dy, again[1])
    small = random_shifts(np.random.default_rng(3), 500, max_shift=1)
    assert set(np.unique(small[0])) == {-1, 0, 1}


def test_jitter_matches_shift_images_with_the_same_draws(images):
    dx, dy = random_shifts(np.random.default_rng(4), len(images))
    np.testing.assert_array_equal(jitter(images, np.random.default_rng(4)), shift_images(images, dx, dy))
