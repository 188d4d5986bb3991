"""Looking inside models: attention, attributions, head importance."""
