"""The discovery-aggregator: local and federated agent search across this mesh's federation peers."""
