"""The HTTP/JSON edge: REST routes transcoded to gRPC from the protos' google.api.http annotations."""
