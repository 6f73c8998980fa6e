"""Lightning side of the project: the LightningModule, run configuration and run assembly."""
