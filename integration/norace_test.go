//go:build !race

package integration

// raceEnabled is true when the tests run with -race; the product binaries
// are then built with -race too, so that races in the real processes show.
const raceEnabled = false
