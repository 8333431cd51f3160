"""Batch jobs: endpoints, job specs, inputs, predictors and the job runner."""
