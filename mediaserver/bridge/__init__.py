"""The call bridge: one nursery per call between a Twilio stream and a model."""
