package agentk

import (
	"testing"
	"time"
)

func TestBackoffSequence(t *testing.T) {
	tests := []struct {
		name string
		b    Backoff
		want []time.Duration
	}{
		{
			name: "GitLab values without jitter",
			b:    Backoff{Jitter: -1},
			want: []time.Duration{
				1 * time.Second, 1600 * time.Millisecond, 2560 * time.Millisecond,
				4096 * time.Millisecond, 6553600 * time.Microsecond, 10485760 * time.Microsecond,
				16777216 * time.Microsecond, 20 * time.Second, 20 * time.Second,
			},
		},
		{
			name: "jitter widens the delay below the cap and stays within it at the cap",
			b:    Backoff{Rand: func() float64 { return 0.5 }},
			want: []time.Duration{
				1100 * time.Millisecond, 1760 * time.Millisecond, 2816 * time.Millisecond,
				4505600 * time.Microsecond, 7208960 * time.Microsecond, 11534336 * time.Microsecond,
				// base 16.78 s: [20 s / 1.2, 20 s]; base 20 s: the same.
				18333333333 * time.Nanosecond, 18333333333 * time.Nanosecond, 18333333333 * time.Nanosecond,
			},
		},
		{
			name: "the largest jitter reaches the cap and not beyond",
			b:    Backoff{Rand: func() float64 { return 1 }},
			want: []time.Duration{
				1200 * time.Millisecond, 1920 * time.Millisecond, 3072 * time.Millisecond,
				4915200 * time.Microsecond, 7864320 * time.Microsecond, 12582912 * time.Microsecond,
				20 * time.Second, 20 * time.Second, 20 * time.Second,
			},
		},
		{
			name: "custom values",
			b:    Backoff{Initial: time.Millisecond, Max: 5 * time.Millisecond, Factor: 2, Jitter: 0.1, Rand: func() float64 { return 1 }},
			want: []time.Duration{
				1100 * time.Microsecond, 2200 * time.Microsecond, 4400 * time.Microsecond, 5 * time.Millisecond, 5 * time.Millisecond,
			},
		},
		{
			name: "max below initial is raised to initial",
			b:    Backoff{Initial: 3 * time.Second, Max: time.Second, Rand: func() float64 { return 0 }},
			want: []time.Duration{3 * time.Second, 3 * time.Second},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := tt.b
			for i, want := range tt.want {
				got := b.Next(0)
				// Float arithmetic may be off by a nanosecond or so.
				if diff := got - want; diff < -time.Microsecond || diff > time.Microsecond {
					t.Errorf("delay %d = %v, want %v", i, got, want)
				}
			}
		})
	}
}

func TestBackoffBounds(t *testing.T) {
	// Whatever the random source says, no delay is below Initial or above
	// Max: the README promises 1 s to 20 s, jitter included. Below the
	// cap a delay stays within [base, base × (1 + jitter)].
	for _, r := range []float64{0, 0.25, 0.5, 0.999999, 1} {
		b := DefaultBackoff()
		b.Rand = func() float64 { return r }
		base := DefaultBackoffInitial
		for i := range 30 {
			got := b.Next(0)
			if got < DefaultBackoffInitial || got > DefaultBackoffMax {
				t.Fatalf("rand %v, delay %d = %v, want within [%v, %v]", r, i, got, DefaultBackoffInitial, DefaultBackoffMax)
			}
			if hi := time.Duration(float64(base) * (1 + DefaultBackoffJitter)); hi <= DefaultBackoffMax {
				if got < base-time.Microsecond || got > hi+time.Microsecond {
					t.Fatalf("rand %v, delay %d = %v, want within [%v, %v]", r, i, got, base, hi)
				}
			}
			base = min(time.Duration(float64(base)*DefaultBackoffFactor), DefaultBackoffMax)
		}
	}
	// At the cap the delays still spread over a sixth of it, so that a
	// fleet of agents does not reconnect in lockstep.
	lo, hi := DefaultBackoff(), DefaultBackoff()
	lo.Rand, hi.Rand = func() float64 { return 0 }, func() float64 { return 1 }
	var dlo, dhi time.Duration
	for range 30 {
		dlo, dhi = lo.Next(0), hi.Next(0)
	}
	if spread := dhi - dlo; spread < 3*time.Second {
		t.Errorf("delays at the cap spread over %v (%v to %v), want at least 3s", spread, dlo, dhi)
	}
}

func TestBackoffReset(t *testing.T) {
	tests := []struct {
		name   string
		uptime time.Duration
		want   time.Duration
	}{
		{"failed attempt keeps growing", 0, 4096 * time.Millisecond},
		{"short connection keeps growing", 24 * time.Second, 4096 * time.Millisecond},
		{"connection up for the reset time starts over", 25 * time.Second, time.Second},
		{"long connection starts over", time.Hour, time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := Backoff{Rand: func() float64 { return 0 }}
			for range 3 { // 1s, 1.6s, 2.56s
				b.Next(0)
			}
			got := b.Next(tt.uptime)
			if diff := got - tt.want; diff < -time.Microsecond || diff > time.Microsecond {
				t.Errorf("Next(%v) = %v, want %v", tt.uptime, got, tt.want)
			}
			// After a reset the sequence grows again from Initial.
			if tt.want == time.Second {
				if got := b.Next(0); got != 1600*time.Millisecond {
					t.Errorf("delay after reset = %v, want 1.6s", got)
				}
			}
		})
	}
}
