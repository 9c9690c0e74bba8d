"""Deployment: images, Kubernetes manifests, the balancer configuration, dashboards, and a local fleet."""
