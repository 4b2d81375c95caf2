-- Reference data: districts, vendors, devices, meters, sensors, channels; and the quarantine.
-- A channel is the unit readings are stored against: one measured quantity of one device, with
-- the canonical unit it is stored in.

CREATE TABLE dmas (
    id                        text PRIMARY KEY,
    name                      text NOT NULL DEFAULT '',
    timezone                  text NOT NULL,
    mains_km                  double precision NOT NULL DEFAULT 0,
    service_connections       integer NOT NULL DEFAULT 0,
    private_pipe_km           double precision NOT NULL DEFAULT 0,
    avg_pressure_m            double precision,
    unmetered_households      integer NOT NULL DEFAULT 0,
    unmetered_non_households  integer NOT NULL DEFAULT 0,
    updated_at                timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE vendors (
    id       text PRIMARY KEY,
    name     text NOT NULL DEFAULT '',
    payload  text NOT NULL DEFAULT 'json'
);

CREATE TABLE devices (
    id          text PRIMARY KEY,
    vendor_id   text NOT NULL REFERENCES vendors (id),
    protocol    text NOT NULL,
    dma_id      text REFERENCES dmas (id),
    gateway     text,
    serial      bigint,
    params      jsonb NOT NULL DEFAULT '{}',
    active      boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX devices_vendor_serial ON devices (vendor_id, serial) WHERE serial IS NOT NULL;

CREATE TABLE meters (
    id               text PRIMARY KEY,
    device_id        text NOT NULL REFERENCES devices (id),
    dma_id           text REFERENCES dmas (id),
    account          text,
    customer_type    text NOT NULL DEFAULT 'household',
    dn               integer,
    q3               double precision,
    q4               double precision,
    register_digits  integer NOT NULL DEFAULT 5,
    install_date     date,
    active           boolean NOT NULL DEFAULT true
);

CREATE TABLE meter_exchanges (
    meter_id            text NOT NULL REFERENCES meters (id),
    exchanged_at        timestamptz NOT NULL,
    old_register_final  double precision NOT NULL,
    new_register_start  double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (meter_id, exchanged_at)
);

CREATE TABLE sensors (
    id         text PRIMARY KEY,
    device_id  text NOT NULL REFERENCES devices (id),
    dma_id     text REFERENCES dmas (id),
    kind       text NOT NULL
);

CREATE TABLE channels (
    id         serial PRIMARY KEY,
    device_id  text NOT NULL REFERENCES devices (id),
    name       text NOT NULL,
    quantity   text NOT NULL,
    unit       text NOT NULL,
    kind       text NOT NULL DEFAULT '',
    role       text NOT NULL DEFAULT '',
    meter_id   text REFERENCES meters (id),
    sensor_id  text REFERENCES sensors (id),
    dma_id     text REFERENCES dmas (id),
    min_value  double precision,
    max_value  double precision,
    params     jsonb NOT NULL DEFAULT '{}',
    UNIQUE (device_id, name)
);

-- Every input that was not stored as a reading, with why. Nothing is silently dropped.
CREATE TABLE quarantine (
    id           bigserial PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    source       text NOT NULL,
    address      text NOT NULL DEFAULT '',
    device_id    text,
    reason       text NOT NULL,
    detail       text NOT NULL DEFAULT '',
    raw          bytea
);
CREATE INDEX quarantine_reason_time ON quarantine (reason, received_at);

-- Which channel-days received data and when: analytics recompute exactly the days whose data
-- changed after they were last computed (late NB-IoT uplinks, gateway replays).
CREATE TABLE ingest_days (
    channel_id  integer NOT NULL,
    day         date NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel_id, day)
);
CREATE INDEX ingest_days_updated ON ingest_days (updated_at);
