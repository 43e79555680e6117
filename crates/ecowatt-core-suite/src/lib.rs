//! The device core's suite, as plain functions over `alloc`: the device
//! machine on virtual time against a server double (a day, outages, power cuts
//! at every write, updates, bad input), the key-value store on NOR flash (a
//! power cut at every flash operation) and the OTA slot rules. `cargo test`
//! runs each as a test on the host; `firmware/qemu-suite` runs the same
//! functions on `riscv32imc-unknown-none-elf` under QEMU, where `Rc` stands in
//! for `Arc` and there is no atomic read-modify-write.
#![no_std]
// A test suite: each function is named for what it checks.
#![allow(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod doubles;
pub mod flashkv;
pub mod limit;
pub mod machine;
pub mod ota;
pub mod schedule;
pub mod world;

macro_rules! suite {
    ($($module:ident :: $name:ident),* $(,)?) => {
        /// Every check, by name, in the order a runner runs them.
        pub const SUITE: &[(&str, fn())] =
            &[$((concat!(stringify!($module), "::", stringify!($name)), $module::$name)),*];

        #[cfg(test)]
        mod host {
            $(#[test]
            fn $name() {
                super::$module::$name()
            })*
        }
    };
}

suite! {
    flashkv::flashkv_keeps_the_newest_value_across_remounts_and_compactions,
    flashkv::flashkv_survives_a_power_cut_at_every_flash_operation,
    flashkv::flashkv_says_when_it_is_full_and_keeps_what_it_has,
    flashkv::flashkv_refuses_what_cannot_fit_and_reads_an_erased_region_as_empty,
    machine::a_day_of_a_device,
    machine::a_power_cut_at_every_storage_write_loses_nothing,
    machine::a_device_on_flash_loses_nothing_at_a_power_cut_at_any_flash_operation,
    machine::an_update_installs_boots_on_trial_and_confirms,
    machine::an_update_with_a_power_cut_at_every_write_ends_on_a_verified_image,
    machine::a_trial_image_that_cannot_reach_the_server_rolls_back,
    machine::a_forged_update_is_refused_before_a_byte_is_fetched,
    machine::a_broken_flash_fails_the_update_and_the_device_goes_on,
    machine::an_update_whose_download_keeps_failing_is_reported_failed,
    machine::garbage_and_oversized_answers_are_refused_and_nothing_is_lost,
    machine::a_silent_inverter_is_reported_and_the_device_stays_in_touch,
    machine::a_full_store_loses_no_acknowledged_sample,
    machine::samples_the_server_will_never_take_are_dropped_and_counted,
    machine::uploads_use_the_newest_codec_both_sides_name_and_fall_back_when_refused,
    machine::a_v1_only_device_states_no_codecs_and_keeps_v1,
    machine::a_device_without_a_server_samples_and_takes_local_commands_checked_and_read_back,
    machine::a_command_delivered_again_runs_once,
    machine::a_backlog_goes_in_full_batches_and_the_rest_waits_for_the_interval,
    machine::a_cut_fetch_resumes_where_it_stopped,
    machine::a_tampered_image_is_refused_after_download_and_never_boots,
    machine::an_encrypted_update_is_decrypted_as_it_streams_resumes_at_a_chunk_and_confirms,
    machine::a_tampered_or_foreign_encrypted_chunk_is_refused_and_nothing_switches,
    machine::a_device_that_takes_no_encrypted_images_gets_them_clear,
    machine::a_device_without_trusted_keys_refuses_every_update,
    limit::a_silent_server_lapses_the_lease_into_the_failsafe_within_a_poll,
    limit::a_restart_mid_lease_resumes_it_with_the_remaining_time,
    limit::a_lease_that_ran_out_while_off_applies_the_failsafe_first,
    limit::a_lease_is_renewed_across_an_outage_a_little_shorter_than_it,
    limit::a_command_wins_over_a_lapsed_lease_and_an_unleased_limit_ends_it,
    limit::a_failsafe_of_no_change_holds_and_is_reported,
    limit::a_failsafe_the_inverter_does_not_take_is_reported_failed,
    limit::a_power_cut_at_every_write_of_a_lapse_ends_on_the_failsafe_reported_once,
    limit::a_ramp_steps_no_faster_than_its_rate_and_confirms_each_step,
    limit::a_new_limit_takes_over_a_ramp_from_where_it_is,
    limit::a_ramp_the_inverter_stops_taking_fails_with_the_value_reached,
    limit::a_lease_that_lapses_mid_ramp_ends_the_ramp_in_the_failsafe,
    schedule::a_schedule_runs_offline_step_on_time,
    schedule::a_command_a_lease_and_the_failsafe_win_over_the_schedule_in_that_order,
    schedule::a_restart_neither_writes_a_step_again_nor_undoes_a_command,
    schedule::past_its_horizon_a_schedule_ends_in_the_failsafe,
    schedule::a_step_the_inverter_does_not_take_is_reported_failed_and_tried_again,
    ota::a_good_update_boots_on_trial_and_is_kept_once_confirmed,
    ota::nothing_is_switched_for_a_changed_byte_a_wrong_key_or_an_old_version,
    ota::an_image_that_fails_its_health_check_is_rolled_back,
    ota::a_cut_download_resumes_where_it_stopped,
    ota::a_power_cut_at_any_write_leaves_a_bootable_verified_image,
    ota::an_update_on_flash_slots_survives_a_power_cut_at_every_flash_operation,
}
