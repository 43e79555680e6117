//! The simulator's shared state: inverters by slave address, the clock and
//! the pending fault flags; answers RTU frames (SIM HTTP API) and PDUs
//! (Modbus TCP).

use std::collections::BTreeMap;
use std::sync::Arc;

use ecowatt_proto::modbus::{
    Exception, ExceptionCode, FrameError, READ_HOLDING_REGISTERS, Request, Response,
    WRITE_SINGLE_REGISTER, rtu,
};
use serde::Serialize;

use crate::clock::SimClock;
use crate::faults::{self, Fault, FaultQueue};
use crate::inverter::Inverter;
use crate::model::ModelConfig;

/// Which SIM API endpoint a frame came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/api/inverter/read`: takes `0x03` frames.
    Read,
    /// `/api/inverter/write`: takes `0x06` frames.
    Write,
}

/// What the SIM HTTP API sends back for a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// This frame, now.
    Frame(Vec<u8>),
    /// This frame, after this many milliseconds.
    Delayed(u64, Vec<u8>),
    /// Nothing: the frame was invalid, addressed to no inverter, or dropped.
    Blank,
}

/// Request counters, for `/api/sim/state` and benchmarks.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counters {
    /// Frames and PDUs received.
    pub requests: u64,
    /// Frames that were not valid Modbus (blank answer).
    pub invalid: u64,
    /// Requests refused with an exception (injected ones included).
    pub exceptions: u64,
    /// Fault flags applied.
    pub faults_applied: u64,
}

/// Every inverter, the clock and the fault flags.
pub struct Simulator {
    inverters: BTreeMap<u8, Inverter>,
    clock: Arc<dyn SimClock>,
    faults: FaultQueue,
    counters: Counters,
}

/// One inverter's state, in engineering units, for `/api/sim/state`.
#[derive(Debug, Clone, Serialize)]
pub struct InverterState {
    /// Slave address.
    pub slave: u8,
    /// Rated AC power, W.
    pub rated_w: u32,
    /// Seed of its weather.
    pub seed: u64,
    /// Registers 0..=9, raw.
    pub registers: [u16; 10],
    /// AC output power, W.
    pub pac_w: f64,
    /// Export limit, %.
    pub limit_pct: u16,
    /// Irradiance on its array, W/m².
    pub irradiance: f64,
    /// The values the export limit was written with, oldest first (the last
    /// [`crate::inverter::WRITES_KEPT`]).
    pub limit_writes: Vec<u16>,
    /// Writes of the export limit in all.
    pub limit_writes_total: u64,
}

impl Simulator {
    /// A simulator with these inverters (slave address, physics) and clock.
    pub fn new(inverters: &[(u8, ModelConfig)], clock: Arc<dyn SimClock>) -> Self {
        Simulator {
            inverters: inverters.iter().map(|(s, c)| (*s, Inverter::new(*s, c.clone()))).collect(),
            clock,
            faults: FaultQueue::default(),
            counters: Counters::default(),
        }
    }

    /// The simulated time now.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Queues a one-shot fault flag; `false` when too many are pending.
    pub fn add_fault(&mut self, fault: Fault) -> bool {
        self.faults.push(fault)
    }

    /// Fault flags not yet applied.
    pub fn pending_faults(&self) -> usize {
        self.faults.len()
    }

    /// The counters so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The inverter at `slave`, if any.
    pub fn inverter_mut(&mut self, slave: u8) -> Option<&mut Inverter> {
        self.inverters.get_mut(&slave)
    }

    /// Every inverter's state now.
    pub fn snapshot(&mut self) -> Vec<InverterState> {
        let now = self.clock.now_ms();
        self.inverters
            .values_mut()
            .map(|inv| {
                let reading = inv.read(now);
                let config = inv.model().config().clone();
                InverterState {
                    slave: inv.slave(),
                    rated_w: config.rated_w,
                    seed: config.seed,
                    registers: reading.to_registers(),
                    pac_w: reading.pac,
                    limit_pct: reading.limit_pct,
                    irradiance: inv.model().irradiance(now / 1000),
                    limit_writes: inv.writes().0,
                    limit_writes_total: inv.writes().1,
                }
            })
            .collect()
    }

    /// Answers an RTU frame from the SIM HTTP API, applying the next fault flag.
    pub fn handle_rtu(&mut self, frame: &[u8], endpoint: Endpoint) -> Answer {
        self.counters.requests += 1;
        let fault = self.faults.pop();
        if fault.is_some() {
            self.counters.faults_applied += 1;
        }
        let Ok((slave, pdu)) = rtu::split(frame) else {
            self.counters.invalid += 1;
            return Answer::Blank;
        };
        let function = pdu.first().copied().unwrap_or(0);
        let response = match self.answer_pdu(slave, pdu, Some(endpoint), fault) {
            PduAnswer::Respond(r) => r,
            // The SIM API answers an invalid frame with a blank (the reference's rule).
            PduAnswer::Ignore | PduAnswer::Malformed => return Answer::Blank,
        };
        let frame = rtu::encode_response(slave, &response);
        match fault {
            Some(Fault::CrcError) => Answer::Frame(faults::corrupt_crc(frame)),
            Some(Fault::Corrupt) => {
                let salt = self.counters.requests ^ u64::from(function) << 32;
                Answer::Frame(faults::garbage(frame.len(), salt))
            }
            Some(Fault::Delay(ms)) => Answer::Delayed(ms, frame),
            _ => Answer::Frame(frame),
        }
    }

    /// Answers a Modbus TCP request PDU for `unit`. Unit `0xFF` (Modbus TCP's
    /// "this device") means the first inverter. Fault flags are not applied here.
    pub fn handle_tcp(&mut self, unit: u8, pdu: &[u8]) -> Response {
        self.counters.requests += 1;
        let slave = match unit {
            0xFF => self.inverters.keys().next().copied().unwrap_or(unit),
            other => other,
        };
        match self.answer_pdu(slave, pdu, None, None) {
            PduAnswer::Respond(r) => r,
            // A PDU whose length is wrong for its function: Modbus's
            // "illegal data value" (the spec's answer to a malformed request).
            PduAnswer::Malformed => Response::Exception(Exception {
                function: pdu.first().copied().unwrap_or(0) & 0x7F,
                code: ExceptionCode::IllegalDataValue,
            }),
            // A gateway's answer for a unit that is not there.
            PduAnswer::Ignore => Response::Exception(Exception {
                function: pdu.first().copied().unwrap_or(0) & 0x7F,
                code: ExceptionCode::GatewayTargetFailedToRespond,
            }),
        }
    }

    fn answer_pdu(
        &mut self,
        slave: u8,
        pdu: &[u8],
        endpoint: Option<Endpoint>,
        fault: Option<Fault>,
    ) -> PduAnswer {
        let now = self.clock.now_ms();
        let Some(inverter) = self.inverters.get_mut(&slave) else {
            self.counters.invalid += 1;
            return PduAnswer::Ignore;
        };
        let function = pdu.first().copied().unwrap_or(0);
        let refuse = |code| Response::Exception(Exception { function, code });
        let request = match Request::decode_pdu(pdu) {
            Ok(request) => request,
            Err(FrameError::UnsupportedFunction { .. }) => {
                self.counters.exceptions += 1;
                return PduAnswer::Respond(refuse(ExceptionCode::IllegalFunction));
            }
            Err(_) => {
                self.counters.invalid += 1;
                return PduAnswer::Malformed;
            }
        };
        let allowed = match endpoint {
            Some(Endpoint::Read) => function == READ_HOLDING_REGISTERS,
            Some(Endpoint::Write) => function == WRITE_SINGLE_REGISTER,
            None => true,
        };
        let response = match fault {
            Some(Fault::PacketDrop) => return PduAnswer::Ignore,
            Some(Fault::Exception(code)) => refuse(ExceptionCode::from(code)),
            _ if !allowed => refuse(ExceptionCode::IllegalFunction),
            _ => inverter.handle(&request, now),
        };
        if matches!(response, Response::Exception(_)) {
            self.counters.exceptions += 1;
        }
        PduAnswer::Respond(response)
    }
}

enum PduAnswer {
    Respond(Response),
    /// No inverter at that address (or the request is lost to a fault).
    Ignore,
    /// The PDU does not decode (its length is wrong for its function).
    Malformed,
}
