//! The inverter, one request at a time: a command cut short by a restart is
//! read back first, then commands (a write, then a read-back that decides
//! success), then the periodic sample.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use ecowatt_proto::messages::{CommandResult, DeviceCommand, EARLIEST_SAMPLE_MS, Operation};
use ecowatt_proto::modbus::{Request, Response};
use ecowatt_proto::registers::REGISTER_COUNT;

use super::limit::{Due, Ramp, limit_write};
use super::{Action, Device, Note};
use crate::kv::KeyValue;
use crate::link::Outcome;
use crate::ota::Slots;
use ecowatt_proto::messages::EpisodeOutcome;
use ecowatt_proto::registers::EXPORT_LIMIT;

/// What the request outstanding is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    /// The periodic read of registers 0..=9.
    Sample,
    /// Reading back the register of a command a restart cut short.
    Resolve,
    /// A command's write.
    Write(u64, Operation),
    /// A command's read-back (after its write, or the read it is).
    ReadBack(u64, Operation),
    /// A fail-safe or resumed limit's write of this value.
    Limit(Due, u16),
    /// Its read-back.
    LimitReadBack(Due, u16),
    /// A schedule step's write of this value.
    Plan(u16),
    /// Its read-back.
    PlanReadBack(u16),
    /// Reading the export limit a ramp starts from.
    RampFrom(u64, Operation, u16),
    /// A ramp's step to this value.
    RampStep(u16),
    /// Its read-back.
    RampReadBack(u16),
}

/// The inverter side of the device.
#[derive(Debug, Default)]
pub(super) struct Inverter {
    outstanding: Option<Job>,
    /// Commands brought by syncs, waiting for the inverter.
    queue: VecDeque<DeviceCommand>,
    /// The interrupted command was looked at this boot.
    resolved: bool,
}

impl Inverter {
    pub(super) fn idle(&self) -> bool {
        self.outstanding.is_none()
    }

    /// Commands waiting.
    pub(super) fn queued(&self) -> usize {
        self.queue.len()
    }

    pub(super) fn enqueue(&mut self, commands: Vec<DeviceCommand>) {
        for c in commands {
            if !self.queue.iter().any(|q| q.id == c.id) {
                self.queue.push_back(c);
            }
        }
    }
}

fn register_of(op: Operation) -> u16 {
    match op {
        Operation::Write { register, .. } | Operation::Read { register } => register,
    }
}

/// Values of the registers in `mask`, in address order.
fn selected(regs: &[u16], mask: u16) -> Vec<u16> {
    (0..REGISTER_COUNT.min(regs.len())).filter(|r| mask & (1 << r) != 0).map(|r| regs[r]).collect()
}

fn read_one(register: u16) -> Request {
    Request::ReadHoldingRegisters { start: register, quantity: 1 }
}

impl<K: KeyValue, S: Slots> Device<K, S> {
    fn ask(&mut self, job: Job, request: Request) {
        self.inverter.outstanding = Some(job);
        let slave = self.settings.slave;
        self.actions.push_back(Action::Inverter { slave, request });
    }

    pub(super) fn advance_inverter(&mut self, now_ms: u64) {
        if !self.inverter.idle() {
            return;
        }
        if !self.inverter.resolved {
            self.inverter.resolved = true;
            if let Some((_, op)) = self.journal.interrupted() {
                match op {
                    Some(op) => return self.ask(Job::Resolve, read_one(register_of(op))),
                    None => self.resolve(now_ms, None),
                }
            }
        }
        // A lapsed lease's fail-safe (or its return) goes before commands.
        if let Some(due) = self.limit.start_write() {
            if let Some(v) = self.limit_target(now_ms, due) {
                let request = Request::WriteSingleRegister { address: EXPORT_LIMIT, value: v };
                return self.ask(Job::Limit(due, v), request);
            }
        }
        if let Some(v) = self.schedule.start_write(now_ms) {
            let request = Request::WriteSingleRegister { address: EXPORT_LIMIT, value: v };
            return self.ask(Job::Plan(v), request);
        }
        while let Some(mut cmd) = self.inverter.queue.front().copied() {
            if let Some(ramp) = self.limit.ramp {
                // A new limit takes over a ramp from where it is; other
                // commands wait for the ramp's end (one command in flight).
                if limit_write(cmd.op).is_none() || cmd.expires_ms < now_ms {
                    break;
                }
                self.limit.ramp = None;
                let (id, op, value) = (ramp.command_id, ramp.op, ramp.value);
                self.finish_command(id, op, false, None, Some(value), now_ms);
            }
            self.inverter.queue.pop_front();
            if cmd.expires_ms < now_ms {
                continue;
            }
            // A return to the schedule writes the schedule's limit in force.
            if let (Some(_), Some(v)) = (limit_write(cmd.op), self.resume_value(cmd.id, now_ms)) {
                cmd.op = Operation::Write { register: EXPORT_LIMIT, value: v };
            }
            match self.journal.begin(&mut self.kv, cmd.id, cmd.op) {
                Ok(true) => {}
                Ok(false) => continue, // already executed; its result is on its way
                Err(e) => {
                    // Not recorded as in flight, so not run: it comes again with the next sync.
                    self.say(Note::StorageFailed("command journal", e));
                    continue;
                }
            }
            if let (Some(_), Some(rate)) = (limit_write(cmd.op), self.limit.ramp_rate(cmd.id)) {
                return self.ask(Job::RampFrom(cmd.id, cmd.op, rate), read_one(EXPORT_LIMIT));
            }
            return match cmd.op {
                Operation::Write { register, value } => self.ask(
                    Job::Write(cmd.id, cmd.op),
                    Request::WriteSingleRegister { address: register, value },
                ),
                Operation::Read { register } => {
                    self.ask(Job::ReadBack(cmd.id, cmd.op), read_one(register))
                }
            };
        }
        if let Some(ramp) = self.limit.ramp.filter(|r| now_ms >= r.next_at) {
            let v = ramp.due(now_ms);
            let request = Request::WriteSingleRegister { address: EXPORT_LIMIT, value: v };
            return self.ask(Job::RampStep(v), request);
        }
        if self.sched.poll_due(now_ms) {
            let request =
                Request::ReadHoldingRegisters { start: 0, quantity: REGISTER_COUNT as u16 };
            self.ask(Job::Sample, request);
        }
    }

    pub(super) fn on_inverter(&mut self, now_ms: u64, outcome: Outcome) {
        let Some(job) = self.inverter.outstanding.take() else { return };
        let values = match &outcome {
            Ok(Ok(Response::ReadHoldingRegisters(v))) => Some(v.as_slice()),
            _ => None,
        };
        match job {
            Job::Sample => self.on_sample(now_ms, outcome),
            Job::Resolve => self.resolve(now_ms, values.and_then(|v| v.first().copied())),
            Job::Write(id, op) => match outcome {
                Ok(Ok(_)) => self.ask(Job::ReadBack(id, op), read_one(register_of(op))),
                Ok(Err(exception)) => {
                    self.finish_command(id, op, false, Some(exception.code.as_u8()), None, now_ms)
                }
                Err(_) => self.finish_command(id, op, false, None, None, now_ms),
            },
            Job::Limit(due, v) => match outcome {
                Ok(Ok(_)) => self.ask(Job::LimitReadBack(due, v), read_one(EXPORT_LIMIT)),
                _ => self.end_episode(now_ms, due, v, EpisodeOutcome::Failed),
            },
            Job::LimitReadBack(due, v) => {
                let outcome = match values.and_then(|r| r.first().copied()) {
                    Some(read) if read == v => EpisodeOutcome::Confirmed,
                    _ => EpisodeOutcome::Failed,
                };
                self.end_episode(now_ms, due, v, outcome)
            }
            Job::Plan(v) => match outcome {
                Ok(Ok(_)) => self.ask(Job::PlanReadBack(v), read_one(EXPORT_LIMIT)),
                _ => self.plan_written(now_ms, v, false),
            },
            Job::PlanReadBack(v) => {
                let read = values.and_then(|r| r.first().copied());
                self.plan_written(now_ms, v, read == Some(v))
            }
            Job::RampFrom(id, op, rate) => {
                match (limit_write(op), values.and_then(|v| v.first().copied())) {
                    (Some(target), Some(from)) if from == target => {
                        self.finish_command(id, op, true, None, Some(from), now_ms)
                    }
                    (Some(target), Some(from)) => {
                        self.limit.ramp = Some(Ramp::new(id, op, from, target, rate, now_ms));
                        self.say(Note::Ramp { command_id: id, value: from, target });
                    }
                    _ => {
                        let exception = match &outcome {
                            Ok(Err(e)) => Some(e.code.as_u8()),
                            _ => None,
                        };
                        self.finish_command(id, op, false, exception, None, now_ms)
                    }
                }
            }
            Job::RampStep(v) => match outcome {
                Ok(Ok(_)) => self.ask(Job::RampReadBack(v), read_one(EXPORT_LIMIT)),
                other => {
                    let exception = match other {
                        Ok(Err(e)) => Some(e.code.as_u8()),
                        _ => None,
                    };
                    if let Some(r) = self.limit.ramp.take() {
                        self.finish_command(
                            r.command_id,
                            r.op,
                            false,
                            exception,
                            Some(r.value),
                            now_ms,
                        )
                    }
                }
            },
            Job::RampReadBack(v) => {
                let Some(mut r) = self.limit.ramp.take() else { return };
                match values.and_then(|x| x.first().copied()) {
                    Some(read) if read == v && v == r.target => {
                        self.finish_command(r.command_id, r.op, true, None, Some(v), now_ms)
                    }
                    Some(read) if read == v => {
                        r.value = v;
                        r.next_at = r.next_step_after(now_ms);
                        self.limit.ramp = Some(r);
                        self.say(Note::Ramp {
                            command_id: r.command_id,
                            value: v,
                            target: r.target,
                        });
                    }
                    read => self.finish_command(r.command_id, r.op, false, None, read, now_ms),
                }
            }
            Job::ReadBack(id, op) => match (&outcome, values.and_then(|v| v.first().copied())) {
                (_, Some(v)) => {
                    // Success is what the register reads back, not the echo.
                    let ok = match op {
                        Operation::Write { value, .. } => v == value,
                        Operation::Read { .. } => true,
                    };
                    self.finish_command(id, op, ok, None, Some(v), now_ms)
                }
                (Ok(Err(exception)), None) => {
                    self.finish_command(id, op, false, Some(exception.code.as_u8()), None, now_ms)
                }
                _ => self.finish_command(id, op, false, None, None, now_ms),
            },
        }
    }

    fn on_sample(&mut self, now_ms: u64, outcome: Outcome) {
        match outcome {
            // A clock that was never set stamps 1970: the server would refuse
            // such a sample, so it is not stored.
            Ok(Ok(_)) if now_ms < EARLIEST_SAMPLE_MS => self.say(Note::ClockNotSet),
            Ok(Ok(Response::ReadHoldingRegisters(regs))) => {
                let mask = self.config.registers;
                match self.log.append(&mut self.kv, now_ms, mask, selected(&regs, mask)) {
                    // Without a server nothing is uploaded: only the newest is kept.
                    Ok(seq) if !self.settings.cloud && seq > 1 => {
                        if let Err(e) = self.log.ack(&mut self.kv, seq - 1) {
                            self.say(Note::StorageFailed("sample", e));
                        }
                        self.say(Note::Sampled { seq })
                    }
                    Ok(seq) => self.say(Note::Sampled { seq }),
                    Err(e) => self.say(Note::StorageFailed("sample", e)),
                }
            }
            Ok(Ok(_)) => {} // the link checks an answer matches its request
            Ok(Err(exception)) => self.say(Note::InverterRefused(exception)),
            Err(e) => self.say(Note::InverterUnreachable(e)),
        }
    }

    fn resolve(&mut self, now_ms: u64, read_back: Option<u16>) {
        match self.journal.resolve(&mut self.kv, read_back, now_ms) {
            Ok(Some(r)) => self.say(Note::InterruptedResolved(r)),
            Ok(None) => {}
            Err(e) => self.say(Note::StorageFailed("command journal", e)),
        }
    }

    pub(super) fn finish_command(
        &mut self,
        id: u64,
        op: Operation,
        succeeded: bool,
        exception: Option<u8>,
        value: Option<u16>,
        now_ms: u64,
    ) {
        let result =
            CommandResult { command_id: id, succeeded, exception, value, executed_ms: now_ms };
        self.say(Note::CommandExecuted { op, result });
        if let (true, Some(v)) = (succeeded, limit_write(op)) {
            self.limit_commanded(now_ms, id, v);
            self.plan_commanded(now_ms, id);
        }
        if let Err(e) = self.journal.finish(&mut self.kv, result) {
            // Still in flight in the store: after a restart it is read back and reported.
            self.say(Note::StorageFailed("command result", e));
        }
        // Without a server nobody collects results: the note was the report.
        if !self.settings.cloud {
            if let Err(e) = self.journal.acknowledged(&mut self.kv, &[result]) {
                self.say(Note::StorageFailed("command journal", e));
            }
        }
    }
}
