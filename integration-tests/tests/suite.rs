//! The end-to-end tests against the real services, as one test binary: each module is one
//! file of this directory, one scenario or area (`cargo test -p pgferry-integration-tests --test
//! suite -- faults::` runs one file's tests). One binary instead of one per file: each links
//! rdkafka and libpq, and ~50 of them took minutes to link and more disk than a CI machine had.

mod bad_input;
mod bad_input_services;
mod cascade;
mod check;
mod clock_skew;
mod conflicts;
mod conflicts_cli;
mod convergence;
mod create_table;
mod ddl;
mod ddl_across_origins;
mod dead_letters;
mod delta_reordered_insert;
mod deploy_files;
mod diff_repair;
mod failover;
mod faults;
mod grouped_apply;
mod grouped_apply_failures;
mod idle;
mod independent_consumer;
mod init_report;
mod jdbc_sink;
mod local_delete_racing_insert;
mod metrics;
mod more_types;
mod names;
mod node_add;
mod node_remove;
mod on_error;
mod one_stopped_origin;
mod primary_key_change;
mod python_consumer;
mod rebuild_unstamped_rows;
mod replay;
mod replication_sets;
mod repset;
mod resolvers_before_image;
mod restart_safety;
mod secondary_unique_keys;
mod secrets;
mod security;
mod snowflake;
mod stamps_under_skip_change;
mod status;
mod three_nodes;
mod toast_and_evolution;
mod tombstones;
mod truncate;
mod truncate_across_origins;
mod two_nodes_types;
mod unchanged_toast;
mod user_triggers;
