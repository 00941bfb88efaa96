"""The sample transform: RawSample → one model sample (DATA.md §4).

One implementation for training (augmentation, condition dropout, state noise) and for
validation (all probabilities 0); a live observation (no future actions) is served with the same image
and state functions it calls (encoders.image_encoding.preprocess_images, action_space.scatter).
All randomness comes from the generator the caller passes, which the pipeline derives from (seed, sample index).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Mapping

import numpy as np

from rdt_jax.data import augment, image_transform, language
from rdt_jax.data.schema import IMG_HISTORY, NUM_CAMERAS, BatchConfig, RawSample, sample_spec


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """Training defaults of the official fine-tuning script; `TransformConfig.eval()` for serving."""

    image_aug: bool = True
    cond_mask_prob: float = 0.1
    cam_ext_mask_prob: float = -1.0  # < 0: the exterior camera uses cond_mask_prob too
    state_noise_snr: float | None = 40.0  # dB; None disables
    validate: bool = True  # check every RawSample's shapes/finiteness

    @classmethod
    def eval(cls) -> TransformConfig:
        return cls(image_aug=False, cond_mask_prob=0.0, cam_ext_mask_prob=-1.0, state_noise_snr=None)


class SampleTransform:
    """Callable `(RawSample, rng) → dict` matching `schema.sample_spec(batch_cfg)`."""

    def __init__(
        self,
        cfg: TransformConfig,
        batch_cfg: BatchConfig,
        *,
        dataset_ids: Mapping[str, int],
        dataset_state_mean: Mapping[str, np.ndarray] | None = None,
        embedding_store: language.EmbeddingStore | None = None,
        embedding_cache_size: int = 256,
    ):
        self.cfg, self.batch_cfg = cfg, batch_cfg
        self.dataset_ids = dict(dataset_ids)
        self.state_mean = {k: np.asarray(v, np.float64) for k, v in (dataset_state_mean or {}).items()}
        if cfg.cond_mask_prob > 0:
            missing = sorted(set(self.dataset_ids) - set(self.state_mean))
            if missing:
                raise KeyError(f"no state_mean in the dataset statistics for {missing} "
                               "(needed to drop the state condition)")
        self.store = embedding_store
        self.spec = sample_spec(batch_cfg)
        self._background = image_transform.background(batch_cfg.image_size)
        self._background.setflags(write=False)
        self._background_f32 = image_transform.normalize(self._background)
        self._background_f32.setflags(write=False)
        self._scratch = threading.local()  # per grain thread: the uint8 image before normalising
        self._load = functools.lru_cache(maxsize=embedding_cache_size)(language.load_embedding)
        self._store_get = functools.lru_cache(maxsize=embedding_cache_size)(self.store.get) if self.store else None

    def _image(self, img: np.ndarray, rng: np.random.Generator, out: np.ndarray | None = None) -> np.ndarray:
        if self.cfg.image_aug:
            img = augment.augment(img, rng)
        return image_transform.preprocess_uint8(img, self.batch_cfg.image_size, out)

    def _uint8_scratch(self) -> np.ndarray:
        buf = getattr(self._scratch, "img", None)
        if buf is None:
            size = self.batch_cfg.image_size
            buf = self._scratch.img = np.empty((3, size, size), np.uint8)
        return buf

    def _language(self, raw: RawSample) -> np.ndarray:
        if raw.lang_embed_path is not None:
            return self._load(raw.lang_embed_path)
        if self.store is None:
            raise ValueError(f"{raw.dataset_name}:{raw.episode_id}: instruction {raw.instruction!r} has no "
                             "precomputed embedding path and no EmbeddingStore was given")
        return self._store_get(raw.instruction)

    def __call__(self, raw: RawSample, rng: np.random.Generator) -> dict[str, np.ndarray]:
        cfg, bcfg = self.cfg, self.batch_cfg
        if raw.dataset_name not in self.dataset_ids:
            raise KeyError(f"unknown dataset name {raw.dataset_name!r} (known: {sorted(self.dataset_ids)})")
        if cfg.validate:
            raw.validate(bcfg.horizon)
        p = cfg.cond_mask_prob

        # 1. control frequency → 0 with prob p.
        ctrl_freq = raw.ctrl_freq if rng.random() >= p else 0.0
        # 2. state noise at the given SNR, per-slot episode std, in float64 before masking.
        states = np.asarray(raw.state, np.float64)[-bcfg.state_len:]
        if states.shape[0] != bcfg.state_len:
            raise ValueError(f"{raw.episode_id}: {states.shape[0]} states, need state_len={bcfg.state_len}")
        if cfg.state_noise_snr is not None:
            sigma = np.asarray(raw.state_std, np.float64) / np.sqrt(10 ** (cfg.state_noise_snr / 10))
            states = states + rng.standard_normal(states.shape) * sigma
        # 3. state → dataset mean with prob p; 4. mask → zeros with prob p (independent).
        if rng.random() < p:
            states = np.broadcast_to(self.state_mean[raw.dataset_name], states.shape)
        mask = raw.state_elem_mask if rng.random() >= p else np.zeros_like(raw.state_elem_mask)

        # 6. images, history-major then camera: [ext, right, left] at t−1, then at t.
        p_ext = cfg.cam_ext_mask_prob if cfg.cam_ext_mask_prob >= 0 else p
        images = np.empty(self.spec["images"].shape, self.spec["images"].dtype)
        valid = np.zeros(NUM_CAMERAS * IMG_HISTORY, bool)
        # uint8: resize straight into the batch slot; float32: resize into a reused scratch
        # image, then normalise straight into the slot.
        direct = images.dtype == np.uint8
        for i in range(IMG_HISTORY):
            for j in range(NUM_CAMERAS):
                k = i * NUM_CAMERAS + j
                keep = rng.random() >= (p_ext if j == 0 else p)
                frames = raw.frames[j]
                if keep and frames.size > 0 and raw.frame_masks[j, i]:
                    px = self._image(frames[i], rng, images[k] if direct else self._uint8_scratch())
                    valid[k] = True
                    if not direct:
                        image_transform.normalize(px, images[k])
                    elif px is not images[k]:
                        images[k] = px
                else:
                    images[k] = self._background if direct else self._background_f32

        # 7. language: the empty embedding with prob p.
        emb = language.empty_embedding() if rng.random() < p else self._language(raw)
        if bcfg.lang_padding == "max":
            lang, lang_mask = language.pad_embedding(emb, bcfg.max_lang_len, self.spec["lang_embeds"].dtype)
        else:  # padded per batch (pipeline.collate)
            language.bucket_length(emb.shape[0], bcfg.max_lang_len)  # refuses an over-long embedding here
            lang, lang_mask = emb.astype(self.spec["lang_embeds"].dtype), np.ones(emb.shape[0], bool)

        return {
            "states": states.astype(np.float32),
            "actions": np.asarray(raw.actions, np.float32),
            "state_elem_mask": np.asarray(mask, np.float32),
            "state_norm": np.asarray(raw.state_norm, np.float32),
            "images": images,
            "image_valid": valid,
            "lang_embeds": lang,
            "lang_attn_mask": lang_mask,
            "ctrl_freqs": np.float32(ctrl_freq),
            "data_indices": np.int32(self.dataset_ids[raw.dataset_name]),
        }
