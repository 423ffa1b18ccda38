"""Lightning callbacks: monitors, demo evaluation."""
