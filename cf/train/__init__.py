"""Training: the shared infrastructure (base, callbacks) and one LightningModule per stage."""
