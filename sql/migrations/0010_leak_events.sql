-- Leak events (issue 11): each rise of a DMA's night flow is its own event (dma.leak_events), so
-- leaks that overlap in one DMA are seen, sized and closed one by one. dma_night_flow rewrites a
-- DMA's events as a unit whenever it recomputes the DMA (the detector walks the whole stored
-- nightly series, so an onset estimate can move when late data arrive); (dma_id, onset_night)
-- identifies an event and is what its DMA_NIGHT_FLOW_RISE alert's evidence names.
CREATE TABLE leak_events (
    dma_id            text NOT NULL REFERENCES dmas (id),
    event_no          integer NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('step', 'ramp')),
    status            text NOT NULL CHECK (status IN ('open', 'confirmed', 'closed')),
    onset_night       date NOT NULL,
    alarm_night       date NOT NULL,
    confirmed_night   date,
    end_night         date,
    size_m3h          double precision NOT NULL,
    confidence        double precision NOT NULL CHECK (confidence BETWEEN 0 AND 1),
    level_before_m3h  double precision NOT NULL,
    sigma_m3h         double precision NOT NULL,
    detector          text NOT NULL,
    computed_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dma_id, onset_night),
    CONSTRAINT leak_events_no UNIQUE (dma_id, event_no)
);
CREATE INDEX leak_events_open ON leak_events (dma_id) WHERE status <> 'closed';

-- Written by the analytics flows like dma_daily (0006_roles): replaced per DMA.
GRANT SELECT, INSERT, UPDATE, DELETE ON leak_events TO aquameter_analytics;
