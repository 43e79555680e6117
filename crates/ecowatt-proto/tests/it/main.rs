//! Integration tests for `ecowatt-proto`: reference vectors, properties, and a
//! cross-check against an independent Modbus implementation.

mod codec_props;
mod independent;
mod props;
mod protocol_vectors;
mod rsa_signatures;
mod vectors;
