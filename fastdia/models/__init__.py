"""The trained models: the denoiser (:mod:`.denoiser`), the critics (:mod:`.critic`), what
they share (:mod:`.common`) and their checkpoints (:mod:`.checkpoint`)."""
