"""Reference implementations the orchestrator is measured against; they import no orchestrator code."""
