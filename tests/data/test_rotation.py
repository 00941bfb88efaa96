"""6-D rotation conversions against scipy (an independent implementation)."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from rdt_jax.data import rotation


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_euler_matches_scipy_extrinsic_xyz(rng):
    e = rng.uniform(-np.pi, np.pi, size=(5, 7, 3))
    want = Rotation.from_euler("xyz", e.reshape(-1, 3)).as_matrix().reshape(5, 7, 3, 3)
    np.testing.assert_allclose(rotation.euler_to_matrix(e), want, atol=1e-12)
    # roll about x only, by hand
    r = rotation.euler_to_matrix([np.pi / 2, 0, 0])
    np.testing.assert_allclose(r, [[1, 0, 0], [0, 0, -1], [0, 1, 0]], atol=1e-12)


def test_quaternion_xyzw_normalised(rng):
    q = rng.normal(size=(11, 4)) * 3.0  # unnormalised on purpose
    want = Rotation.from_quat(q).as_matrix()  # scipy: scalar-last, normalises
    np.testing.assert_allclose(rotation.quaternion_to_matrix(q), want, atol=1e-12)
    # 90° about z: (0, 0, sin45, cos45)
    r = rotation.quaternion_to_matrix([0, 0, np.sqrt(0.5), np.sqrt(0.5)])
    np.testing.assert_allclose(r, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)


def test_6d_layout_and_inverse(rng):
    m = Rotation.random(9, random_state=1).as_matrix()
    d6 = rotation.matrix_to_6d(m)
    np.testing.assert_array_equal(d6[:, 0:3], m[:, :, 0])
    np.testing.assert_array_equal(d6[:, 3:6], m[:, :, 1])
    np.testing.assert_array_equal(rotation.matrix_to_6d(np.arange(9.0).reshape(3, 3)), [0, 3, 6, 1, 4, 7])
    np.testing.assert_allclose(rotation.rotation_6d_to_matrix(d6), m, atol=1e-12)
    # noisy, unnormalised 6-D still gives a proper rotation close to m
    noisy = d6 * 2.5 + rng.normal(scale=1e-3, size=d6.shape)
    r = rotation.rotation_6d_to_matrix(noisy)
    np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)
    np.testing.assert_allclose(r, m, atol=5e-3)


def test_shortcuts_and_errors(rng):
    e = rng.uniform(-3, 3, size=(4, 3))
    q = Rotation.from_euler("xyz", e).as_quat()
    np.testing.assert_allclose(rotation.euler_to_6d(e), rotation.quaternion_to_6d(q), atol=1e-12)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        rotation.quaternion_to_matrix(np.zeros(3))
    with pytest.raises(ValueError, match="3, 3"):
        rotation.matrix_to_6d(np.zeros((2, 3)))
