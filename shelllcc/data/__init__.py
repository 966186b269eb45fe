"""Data: clip datasets, the latent and text caches made from them, and the readers that feed training.

* Clip datasets, TFDS builders writing ArrayRecord (TensorFlow not needed): ``video_folder`` (a user's
  folder of captioned videos), ``embedded_benchmark`` (Moving Textures, rendered by ``moving_textures``);
  ``tfds_prepare`` builds either with its config passed by value.
* Caches: ``latent_cache`` (VAE latents + text embeddings of a clip dataset, encoded once),
  ``text_cache`` (precomputed text-encoder outputs by caption, e.g. Wan2.1's umT5).
* Latents without a cache: ``latent_files`` (``.npy`` / ``.npz``), ``synthetic_latents`` (shells of a
  Gaussian mixture, geometry known exactly), ``random_latents`` (seeded batches for smoke and speed runs).
* ``readers``: grain readers over the caches and datasets, sharded per process.
"""
