//! The change-event model of pgferry and its Avro form.
//!
//! Contract (see `DESIGN.md`, "The change event"):
//! - [`event::ChangeEvent`] is one row change of one source transaction, with column values in
//!   PostgreSQL's text form (the lossless common ground between capture and apply).
//! - [`envelope_schema::TableSchemas`] builds the Avro `Key` and Debezium-compatible `Envelope`
//!   records of a table; [`pg_types`] maps each PostgreSQL type to its Avro type and converts
//!   values both ways without loss.
//! - [`codec`] encodes and decodes Confluent wire format (magic byte 0, 4-byte big-endian schema
//!   id, Avro binary datum). Nothing here does I/O: schema ids come from the caller.

pub mod codec;
pub mod conflict_report;
mod envelope_read;
pub mod envelope_schema;
pub mod event;
pub mod fuzzing;
pub mod heartbeat;
pub mod logical_message;
pub mod naming;
pub mod pg_time;
pub mod pg_types;
pub mod truncate;

pub use codec::{decode_frame, encode_event, encode_event_framed, encode_frame, CodecError, DecodedEvent, EnvelopeReader};
pub use envelope_schema::TableSchemas;
pub use event::{ChangeEvent, ColumnDef, Op, SourceInfo, TableDef};
