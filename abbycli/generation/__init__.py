"""Image generation: provider-neutral requests, the Stability client, local operations, image checks."""
