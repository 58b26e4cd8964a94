"""The distributed runner: FamilyActors, Ray Data streams, the DeepSpeed aggregator on Ray Train, the driver."""
