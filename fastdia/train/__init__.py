"""Training the denoiser and the critics (``fastdia train-denoiser`` / ``train-critic``)."""
