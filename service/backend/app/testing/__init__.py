"""Release testing: policy, gate, audit log and the gate's metrics."""
