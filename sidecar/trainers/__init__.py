"""What each trainer does its own way: state naming, launch script dialect, progress lines."""
