//! The protocol session: counters never reused across power cuts, answers
//! opened once and only for their request.

use ecowatt_core::kv::{KeyValue, MemoryKv};
use ecowatt_core::session::{COUNTER_KEY, Credentials, RESERVE_BLOCK, Session, SessionError};
use ecowatt_proto::messages::MessageType;
use ecowatt_proto::replay::ReplayWindow;
use ecowatt_proto::seal::{self, Direction, EnvelopeError, Header, Keys};

const KEY: [u8; 16] = [7; 16];

fn creds() -> Credentials {
    Credentials { device_id: 42, key: KEY, key_version: 1 }
}

/// What the server does: open, check the window, answer bound to the request.
fn server_answer(request: &[u8], body: &[u8], down_counter: u64) -> Vec<u8> {
    let keys = Keys::derive(&KEY);
    let (h, _) = seal::open(&keys, request, None).unwrap();
    let header = Header {
        msg_type: MessageType::SyncResponse as u8,
        direction: Direction::Down,
        key_version: 1,
        device_id: 42,
        counter: down_counter,
    };
    seal::seal(&keys, &header, Some(h.counter), body)
}

#[test]
fn counters_increase_and_flash_is_written_once_per_block() {
    let mut kv = MemoryKv::new();
    let mut s = Session::start(creds(), &mut kv).unwrap();
    assert_eq!(kv.writes(), 1);
    let keys = Keys::derive(&KEY);
    let mut last = 0;
    for _ in 0..(2 * RESERVE_BLOCK) {
        let env = s.seal(&mut kv, MessageType::SyncRequest, b"").unwrap();
        s.abandon(env.counter);
        let (h, _) = seal::open(&keys, &env.bytes, None).unwrap();
        assert!(h.counter > last);
        last = h.counter;
    }
    assert_eq!(kv.writes(), 2, "one write per {RESERVE_BLOCK} messages");
}

#[test]
fn a_power_cut_at_any_write_never_reuses_a_counter() {
    // Five boots of 100 messages write the reservation 10 times; cut the power
    // at each of those writes in turn. The server's window must accept every
    // counter the device ever sends.
    for cut_at in 0..10 {
        let mut kv = MemoryKv::new();
        let mut window = ReplayWindow { highest: 0, bitmap: 0 };
        let keys = Keys::derive(&KEY);
        let mut sent = 0;
        let mut cut = false;
        kv.fail_after(cut_at);
        for boot in 0..5 {
            let mut s = match Session::start(creds(), &mut kv) {
                Ok(s) => s,
                Err(SessionError::Storage(_)) => {
                    cut = true;
                    kv.heal();
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            for _ in 0..100 {
                match s.seal(&mut kv, MessageType::SyncRequest, b"x") {
                    Ok(env) => {
                        s.abandon(env.counter);
                        let (h, _) = seal::open(&keys, &env.bytes, None).unwrap();
                        window.accept(h.counter).unwrap_or_else(|e| {
                            panic!("cut {cut_at}, boot {boot}: counter {} {e:?}", h.counter)
                        });
                        sent += 1;
                    }
                    Err(SessionError::Storage(_)) => {
                        // Power cut: power comes back, the device reboots.
                        cut = true;
                        kv.heal();
                        break;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert!(cut, "the power was cut at write {cut_at}");
        assert!(sent > 300, "cut {cut_at}: {sent} sent");
    }
}

#[test]
fn a_corrupt_reservation_is_an_error_not_a_reset() {
    let mut kv = MemoryKv::new();
    kv.set(COUNTER_KEY, &[1, 2, 3]).unwrap();
    assert_eq!(Session::start(creds(), &mut kv).unwrap_err(), SessionError::CorruptCounter);
}

#[test]
fn only_the_answer_to_its_request_opens_and_only_once() {
    let mut kv = MemoryKv::new();
    let mut s = Session::start(creds(), &mut kv).unwrap();
    let req1 = s.seal(&mut kv, MessageType::SyncRequest, b"one").unwrap();
    let answer1 = server_answer(&req1.bytes, b"for one", 1);
    let (t, body) = s.open(req1.counter, &answer1).unwrap();
    assert_eq!((t, body.as_slice()), (MessageType::SyncResponse, &b"for one"[..]));
    assert_eq!(s.open(req1.counter, &answer1), Err(SessionError::NoRequest), "replayed answer");

    // Two requests await at once (a long poll and an upload); answers do not cross.
    let req2 = s.seal(&mut kv, MessageType::SyncRequest, b"two").unwrap();
    let req3 = s.seal(&mut kv, MessageType::TelemetryUpload, b"batch").unwrap();
    assert_eq!(
        s.open(req2.counter, &answer1),
        Err(SessionError::Envelope(EnvelopeError::BadTag)),
        "answer to another request"
    );
    let answer2 = server_answer(&req2.bytes, b"for two", 2);
    assert_eq!(s.open(req3.counter, &answer2), Err(SessionError::Envelope(EnvelopeError::BadTag)));
    let mut tampered = answer2.clone();
    tampered[20] ^= 1;
    assert_eq!(s.open(req2.counter, &tampered), Err(SessionError::Envelope(EnvelopeError::BadTag)));
    assert!(s.open(req2.counter, &answer2).is_ok());

    // The wrong answer type for the request is refused even when authentic.
    assert_eq!(
        s.open(req3.counter, &server_answer(&req3.bytes, b"", 3)),
        Err(SessionError::Unexpected { msg_type: 2 })
    );
    s.abandon(req3.counter);
    assert_eq!(
        s.open(req3.counter, &server_answer(&req3.bytes, b"", 3)),
        Err(SessionError::NoRequest)
    );
    for _ in 0..4 {
        s.seal(&mut kv, MessageType::SyncRequest, b"").unwrap();
    }
    assert_eq!(
        s.seal(&mut kv, MessageType::SyncRequest, b"").unwrap_err(),
        SessionError::TooManyOutstanding
    );
}
