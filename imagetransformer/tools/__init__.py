"""What people do with a trained model's exact likelihood: one module per tool."""
