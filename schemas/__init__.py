"""Avro input schemas, reference policies, Avro to Arrow conversion and the reference data generator."""
